//! Analyst SQL (HTTP and Postgres): static checks, then every number released
//! through the mechanism like a report's.
//!
//! An analyst's statement is planned by DataFusion and the plan must have one
//! shape: `SELECT` dimensions and released aggregates `FROM` one rollup table,
//! optional `WHERE` on dimensions and dates (`=`, `IN`, `<`, `<=`, `>`, `>=`,
//! `BETWEEN`, joined by `AND`), `GROUP BY` the selected dimensions (a date
//! bucket `date_trunc('day', hour)` counts as one), `HAVING` comparing released
//! aggregates with numbers, `ORDER BY` output columns and `LIMIT`. The only
//! aggregates are `sum(<measure>)` and `hll_estimate(hll_merge(visitors))`: no
//! sketch or other binary value leaves, no expression over an aggregate, no
//! join, union, window, subquery or `DISTINCT`. Each refusal names its rule.
//!
//! The true sums and visitor estimates of the groups are computed, every group
//! is released as a cell ([`Cell`]) of the table — its `WHERE` constraints and
//! its group values — so the same rows asked by a report get the same noise;
//! groups under the visitor threshold are dropped; then `HAVING`, `ORDER BY`
//! and `LIMIT` run on the released numbers. Errors while running are not
//! passed on: they could quote a stored value.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, ScalarValue};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::expr::{AggregateFunction, InList, ScalarFunction};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Between, BinaryExpr, Expr, FetchType, LogicalPlan, Operator, SkipType};
use datafusion::prelude::SessionContext;

use super::cell::{Cell, Constraint, Hours};
use super::{Mechanism, Release};
use crate::error::ApiError;

/// The rule an analyst's statement broke, named in the refusal.
fn refuse(rule: &str, why: impl Into<String>) -> ApiError {
    ApiError::BadRequest(format!("analyst SQL, rule `{rule}`: {}", why.into()))
}

/// How a group is formed.
#[derive(Debug, Clone, PartialEq)]
enum Group {
    /// A dimension's value.
    Dimension(String),
    /// A time bucket of `hour` or `date`: `date_trunc(unit, column)`.
    Period { unit: String, column: String },
}

/// A released aggregate.
#[derive(Debug, Clone, PartialEq)]
enum Released {
    /// `sum(measure)`.
    Sum(String),
    /// `hll_estimate(hll_merge(visitors))`.
    Visitors,
}

impl Released {
    fn measure(&self) -> String {
        match self {
            Released::Sum(m) => format!("sum({m})"),
            Released::Visitors => "visitors".into(),
        }
    }
}

/// An output column of the answer.
#[derive(Debug, Clone, PartialEq)]
enum Output {
    Group(usize),
    Number(Released),
}

/// An analyst's statement, checked.
#[derive(Debug, Clone)]
pub struct AnalystQuery {
    table: String,
    predicate: Option<Expr>,
    cell: Cell,
    groups: Vec<(Group, Expr)>,
    outputs: Vec<(String, Output)>,
    having: Vec<(Released, Operator, f64)>,
    order: Vec<(usize, bool)>,
    limit: Option<usize>,
}

fn strip(expr: &Expr) -> &Expr {
    match expr {
        Expr::Alias(a) => strip(&a.expr),
        Expr::Cast(c) => strip(&c.expr),
        Expr::TryCast(c) => strip(&c.expr),
        other => other,
    }
}

fn unqualified(expr: Expr) -> Expr {
    expr.transform(|e| match e {
        Expr::Column(c) => Ok(Transformed::yes(Expr::Column(Column::from_name(c.name)))),
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
    .unwrap_or_else(|e| Expr::Literal(ScalarValue::Utf8(Some(e.to_string())), None))
}

fn literal_text(expr: &Expr) -> Option<String> {
    match strip(expr) {
        Expr::Literal(v, _) if !v.is_null() => Some(match v {
            ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => s.clone(),
            // an instant bound to a parameter (psycopg 3, asyncpg) reads as the time it is, not
            // as the count of microseconds `Display` gives
            ScalarValue::TimestampSecond(..)
            | ScalarValue::TimestampMillisecond(..)
            | ScalarValue::TimestampMicrosecond(..)
            | ScalarValue::TimestampNanosecond(..) => v
                .to_array()
                .ok()
                .and_then(|a| arrow::util::display::array_value_to_string(&a, 0).ok())?,
            other => other.to_string(),
        }),
        _ => None,
    }
}

fn literal_number(expr: &Expr) -> Option<f64> {
    literal_text(expr).and_then(|t| t.parse::<f64>().ok())
}

/// The columns of a rollup by kind: dimensions, measures (`Int64`), and its sketch.
struct Columns {
    dimensions: Vec<String>,
    measures: Vec<String>,
}

fn columns_of(schema: &arrow::datatypes::Schema) -> Columns {
    let mut c = Columns {
        dimensions: Vec::new(),
        measures: Vec::new(),
    };
    for f in schema.fields() {
        match f.data_type() {
            DataType::Int64 => c.measures.push(f.name().clone()),
            DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {}
            _ => c.dimensions.push(f.name().clone()),
        }
    }
    c
}

fn day_hours(text: &str) -> Option<(i64, i64)> {
    let d = NaiveDate::parse_from_str(text.get(..10)?, "%Y-%m-%d").ok()?;
    let h = Hours::days(d, d);
    Some((h.start, h.end))
}

fn instant_hour(text: &str) -> Option<(i64, bool)> {
    // (hour, exact): an instant inside an hour rounds outward by the comparison
    let t = DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S").map(|t| t.and_utc()))
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S").map(|t| t.and_utc()))
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").map(|t| t.and_utc()))
        .ok()
        .or_else(|| {
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|t| t.and_utc())
        })?;
    Some((t.timestamp().div_euclid(3600), t.timestamp().rem_euclid(3600) == 0))
}

/// The hours a comparison of `column` (`date` or `hour`) with `value` keeps.
fn time_range(column: &str, op: Operator, value: &str) -> Option<Hours> {
    let all = Hours::ALL;
    if column == "date" {
        let (start, end) = day_hours(value)?;
        return Some(match op {
            Operator::Eq => Hours { start, end },
            Operator::GtEq => Hours { start, end: all.end },
            Operator::Gt => Hours {
                start: end,
                end: all.end,
            },
            Operator::LtEq => Hours { start: all.start, end },
            Operator::Lt => Hours {
                start: all.start,
                end: start,
            },
            _ => return None,
        });
    }
    let (hour, exact) = instant_hour(value)?;
    Some(match op {
        Operator::Eq if exact => Hours {
            start: hour,
            end: hour + 1,
        },
        Operator::GtEq if exact => Hours {
            start: hour,
            end: all.end,
        },
        Operator::GtEq | Operator::Gt => Hours {
            start: hour + 1,
            end: all.end,
        },
        Operator::Lt if exact => Hours {
            start: all.start,
            end: hour,
        },
        Operator::Lt | Operator::LtEq => Hours {
            start: all.start,
            end: hour + 1,
        },
        _ => return None,
    })
}

fn flipped(op: Operator) -> Operator {
    match op {
        Operator::Lt => Operator::Gt,
        Operator::LtEq => Operator::GtEq,
        Operator::Gt => Operator::Lt,
        Operator::GtEq => Operator::LtEq,
        other => other,
    }
}

/// The constraint one `WHERE` conjunct puts on the rows.
fn narrow(cell: Cell, conjunct: &Expr, columns: &Columns) -> Result<Cell, ApiError> {
    const RULE: &str = "dimension filters";
    let dimension = |e: &Expr| -> Result<String, ApiError> {
        // the column itself: a cast would filter other rows than the cell's identity says
        let bare = match e {
            Expr::Alias(a) => a.expr.as_ref(),
            other => other,
        };
        if matches!(bare, Expr::Cast(_) | Expr::TryCast(_)) {
            return Err(refuse(
                RULE,
                "WHERE compares a column itself with values: no CAST around the column",
            ));
        }
        match strip(e) {
            Expr::Column(c) if columns.dimensions.contains(&c.name) => Ok(c.name.clone()),
            Expr::Column(c) => Err(refuse(
                RULE,
                format!("WHERE may filter dimensions and dates only; `{}` is not one", c.name),
            )),
            _ => Err(refuse(RULE, "WHERE may compare a column with values only")),
        }
    };
    let value = |e: &Expr| literal_text(e).ok_or_else(|| refuse(RULE, "WHERE may compare a column with values only"));
    let is_time = |d: &str| d == "date" || d == "hour";
    match conjunct {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (column, op, literal) = match (strip(left), strip(right)) {
                (Expr::Column(_), _) => (left.as_ref(), *op, right.as_ref()),
                (_, Expr::Column(_)) => (right.as_ref(), flipped(*op), left.as_ref()),
                _ => return Err(refuse(RULE, "WHERE may compare a column with values only")),
            };
            let d = dimension(column)?;
            let v = value(literal)?;
            if !matches!(
                op,
                Operator::Eq | Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq
            ) {
                return Err(refuse(
                    RULE,
                    format!("`{op}` is not allowed in WHERE; use =, IN, <, <=, >, >= or BETWEEN"),
                ));
            }
            if is_time(&d) {
                let hours = time_range(&d, op, &v).ok_or_else(|| {
                    refuse(
                        RULE,
                        format!("`{d}` is compared with something that is not a date or time"),
                    )
                })?;
                return Ok(cell.within(hours));
            }
            let constraint = match op {
                Operator::Eq => Constraint::OneOf(BTreeSet::from([v])),
                Operator::Lt => Constraint::Range {
                    lower: None,
                    upper: Some((v, false)),
                },
                Operator::LtEq => Constraint::Range {
                    lower: None,
                    upper: Some((v, true)),
                },
                Operator::Gt => Constraint::Range {
                    lower: Some((v, false)),
                    upper: None,
                },
                _ => Constraint::Range {
                    lower: Some((v, true)),
                    upper: None,
                },
            };
            Ok(cell.with(&d, constraint))
        }
        Expr::InList(InList {
            expr,
            list,
            negated: false,
        }) => {
            let d = dimension(expr)?;
            if is_time(&d) {
                return Err(refuse(RULE, format!("`{d} IN (…)` is not allowed; give a range")));
            }
            let values = list.iter().map(value).collect::<Result<BTreeSet<_>, _>>()?;
            Ok(cell.with(&d, Constraint::OneOf(values)))
        }
        Expr::Between(Between {
            expr,
            negated: false,
            low,
            high,
        }) => {
            let d = dimension(expr)?;
            let (lo, hi) = (value(low)?, value(high)?);
            if is_time(&d) {
                let from = time_range(&d, Operator::GtEq, &lo);
                let to = time_range(&d, Operator::LtEq, &hi);
                let (Some(from), Some(to)) = (from, to) else {
                    return Err(refuse(
                        RULE,
                        format!("`{d}` is compared with something that is not a date or time"),
                    ));
                };
                return Ok(cell.within(from.and(to)));
            }
            Ok(cell.with(
                &d,
                Constraint::Range {
                    lower: Some((lo, true)),
                    upper: Some((hi, true)),
                },
            ))
        }
        _ => Err(refuse(
            RULE,
            "WHERE may only join comparisons of dimensions with values by AND (no OR, NOT, <>, LIKE or functions)",
        )),
    }
}

/// Which released aggregate `expr` (an aggregate of the plan) is.
fn released_aggregate(expr: &Expr, columns: &Columns) -> Result<Released, ApiError> {
    const RULE: &str = "released aggregates";
    let Expr::AggregateFunction(AggregateFunction { func, params }) = strip(expr) else {
        return Err(refuse(
            RULE,
            "only sum(<measure>) and hll_estimate(hll_merge(visitors)) are released",
        ));
    };
    if params.filter.is_some() || params.distinct || !params.order_by.is_empty() {
        return Err(refuse(
            RULE,
            "aggregates take no FILTER, DISTINCT or ORDER BY; use WHERE",
        ));
    }
    let arg = match params.args.as_slice() {
        [arg] => strip(arg),
        _ => return Err(refuse(RULE, "aggregates take one column")),
    };
    match (func.name().to_ascii_lowercase().as_str(), arg) {
        ("sum", Expr::Column(c)) if columns.measures.contains(&c.name) => Ok(Released::Sum(c.name.clone())),
        ("sum", _) => Err(refuse(
            RULE,
            format!("sum() takes a measure column: one of {}", columns.measures.join(", ")),
        )),
        ("hll_merge", Expr::Column(c)) if c.name == "visitors" => Ok(Released::Visitors),
        (name, _) => Err(refuse(
            RULE,
            format!("`{name}` is not released; only sum(<measure>) and hll_estimate(hll_merge(visitors))"),
        )),
    }
}

/// Schemas that describe tables and hold no visitor's data.
const CATALOG_SCHEMAS: [&str; 2] = ["information_schema", "pg_catalog"];

/// Whether every table `plan` reads is catalog metadata (what BI tools ask before they
/// query): any shape is fine there, a session only lists the tables its role may read.
fn catalog_only(plan: &LogicalPlan) -> bool {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let mut only_catalog = true;
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && !scan.table_name.schema().is_some_and(|s| CATALOG_SCHEMAS.contains(&s))
        {
            only_catalog = false;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    only_catalog
}

/// Checks an analyst's plan; `None` when it reads only catalog metadata (BI tools' questions).
pub fn check(plan: &LogicalPlan, rollups: &[&str]) -> Result<Option<AnalystQuery>, ApiError> {
    if catalog_only(plan) {
        return Ok(None);
    }
    const SHAPE: &str = "one aggregation of one rollup";
    let mut node = plan;
    let mut limit = None;
    if let LogicalPlan::Limit(l) = node {
        limit = match (l.get_skip_type(), l.get_fetch_type()) {
            (Ok(SkipType::Literal(0)), Ok(FetchType::Literal(fetch))) => fetch,
            _ => return Err(refuse(SHAPE, "LIMIT takes a number (and no OFFSET)")),
        };
        node = &l.input;
    }
    let mut sort = None;
    if let LogicalPlan::Sort(s) = node {
        sort = Some(s.expr.clone());
        if let Some(fetch) = s.fetch {
            limit = Some(limit.map_or(fetch, |l: usize| l.min(fetch)));
        }
        node = &s.input;
    }
    let LogicalPlan::Projection(projection) = node else {
        return Err(refuse(
            SHAPE,
            "select dimensions and released aggregates from one rollup, GROUP BY the dimensions",
        ));
    };
    let mut node = projection.input.as_ref();
    let mut having = None;
    if let LogicalPlan::Filter(f) = node {
        having = Some(f.predicate.clone());
        node = &f.input;
    }
    let LogicalPlan::Aggregate(aggregate) = node else {
        return Err(refuse(
            SHAPE,
            "rows of a rollup are partial sums: aggregate them (GROUP BY dimensions, or a total), no joins, \
             unions, windows, DISTINCT or subqueries",
        ));
    };
    // under the aggregate: an optional WHERE, then the scan of one rollup
    let mut input = aggregate.input.as_ref();
    let mut predicate = None;
    loop {
        match input {
            LogicalPlan::Filter(f) if predicate.is_none() => {
                predicate = Some(f.predicate.clone());
                input = &f.input;
            }
            LogicalPlan::SubqueryAlias(a) => input = &a.input,
            LogicalPlan::TableScan(scan) if rollups.contains(&scan.table_name.table()) => break,
            LogicalPlan::TableScan(scan) => {
                return Err(refuse(
                    "rollups only",
                    format!(
                        "`{}` is not a rollup; analysts read {}",
                        scan.table_name,
                        rollups.join(", ")
                    ),
                ));
            }
            _ => return Err(refuse(SHAPE, "FROM one rollup table: no joins, unions or subqueries")),
        }
    }
    let LogicalPlan::TableScan(scan) = input else {
        return Err(refuse(SHAPE, "FROM one rollup table"));
    };
    let table = scan.table_name.table().to_owned();
    let columns = columns_of(scan.source.schema().as_ref());

    // WHERE: constraints on dimensions and dates
    let mut cell = Cell::of(&table);
    if let Some(p) = &predicate {
        if p.exists(|e| {
            Ok(matches!(
                e,
                Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_)
            ))
        })
        .unwrap_or(true)
        {
            return Err(refuse(SHAPE, "subqueries are not allowed"));
        }
        for conjunct in split_conjunction(p) {
            cell = narrow(cell, conjunct, &columns)?;
        }
    }

    // GROUP BY: dimensions, or a time bucket of hour/date
    let mut groups = Vec::new();
    for g in &aggregate.group_expr {
        let group = match strip(g) {
            Expr::Column(c) if columns.dimensions.contains(&c.name) => Group::Dimension(c.name.clone()),
            Expr::ScalarFunction(ScalarFunction { func, args }) if func.name() == "date_trunc" => match args.as_slice()
            {
                [unit, column] => match (literal_text(unit), strip(column)) {
                    // `date` holds whole days: an hour bucket of it would sum a day under an
                    // hour's identity
                    (Some(unit), Expr::Column(c))
                        if (c.name == "hour" && ["hour", "day", "week", "month", "year"].contains(&unit.as_str()))
                            || (c.name == "date" && ["day", "week", "month", "year"].contains(&unit.as_str())) =>
                    {
                        Group::Period {
                            unit,
                            column: c.name.clone(),
                        }
                    }
                    _ => {
                        return Err(refuse(
                            "grouping",
                            "date_trunc('hour'|'day'|'week'|'month'|'year', hour) or date_trunc('day'|'week'|'month'|'year', date)",
                        ));
                    }
                },
                _ => return Err(refuse("grouping", "date_trunc takes a unit and a column")),
            },
            _ => return Err(refuse("grouping", "GROUP BY dimensions, or date_trunc(unit, hour)")),
        };
        groups.push((group, unqualified(strip(g).clone())));
    }
    let aggregates = aggregate
        .aggr_expr
        .iter()
        .map(|e| released_aggregate(e, &columns))
        .collect::<Result<Vec<_>, _>>()?;

    // the answer's columns: group values and released numbers, nothing computed on them
    let agg_schema = aggregate.schema.clone();
    let group_count = aggregate.group_expr.len();
    let output_of = |expr: &Expr| -> Result<Output, ApiError> {
        const RULE: &str = "released aggregates";
        let reference = |e: &Expr| -> Option<usize> {
            match strip(e) {
                Expr::Column(c) => agg_schema.index_of_column(c).ok(),
                _ => None,
            }
        };
        match strip(expr) {
            Expr::ScalarFunction(ScalarFunction { func, args }) if func.name() == "round" && args.len() == 1 => {
                match strip(&args[0]) {
                    Expr::ScalarFunction(ScalarFunction { func, args }) if func.name() == "hll_estimate" => {
                        match args.first().and_then(reference) {
                            Some(i) if i >= group_count && aggregates[i - group_count] == Released::Visitors => {
                                Ok(Output::Number(Released::Visitors))
                            }
                            _ => Err(refuse(RULE, "hll_estimate takes hll_merge(visitors)")),
                        }
                    }
                    _ => Err(refuse(RULE, "no expression over a released number")),
                }
            }
            Expr::ScalarFunction(ScalarFunction { func, args }) if func.name() == "hll_estimate" => {
                match args.first().and_then(reference) {
                    Some(i) if i >= group_count && aggregates[i - group_count] == Released::Visitors => {
                        Ok(Output::Number(Released::Visitors))
                    }
                    _ => Err(refuse(RULE, "hll_estimate takes hll_merge(visitors)")),
                }
            }
            e => match reference(e) {
                Some(i) if i < group_count => Ok(Output::Group(i)),
                Some(i) => match &aggregates[i - group_count] {
                    Released::Visitors => Err(refuse(
                        "no sketches",
                        "a visitors sketch is never released: select hll_estimate(hll_merge(visitors))",
                    )),
                    sum => Ok(Output::Number(sum.clone())),
                },
                None => Err(refuse(
                    RULE,
                    "select group columns and released aggregates only, no expressions over them",
                )),
            },
        }
    };
    let mut outputs = Vec::new();
    for (expr, field) in projection.expr.iter().zip(projection.schema.fields()) {
        outputs.push((field.name().clone(), output_of(expr)?));
    }

    // HAVING: released numbers compared with numbers
    let mut conditions = Vec::new();
    if let Some(h) = &having {
        for conjunct in split_conjunction(h) {
            let Expr::BinaryExpr(BinaryExpr { left, op, right }) = conjunct else {
                return Err(refuse(
                    "having",
                    "HAVING compares released aggregates with numbers, joined by AND",
                ));
            };
            let (number, op, value) = match (output_of(left), literal_number(right)) {
                (Ok(Output::Number(n)), Some(v)) => (n, *op, v),
                _ => match (output_of(right), literal_number(left)) {
                    (Ok(Output::Number(n)), Some(v)) => (n, flipped(*op), v),
                    _ => {
                        return Err(refuse(
                            "having",
                            "HAVING compares released aggregates with numbers (on their released values)",
                        ));
                    }
                },
            };
            if !matches!(
                op,
                Operator::Eq | Operator::NotEq | Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq
            ) {
                return Err(refuse("having", format!("`{op}` is not a comparison")));
            }
            conditions.push((number, op, value));
        }
    }

    // ORDER BY: output columns
    let mut order = Vec::new();
    for s in sort.unwrap_or_default() {
        let position = match strip(&s.expr) {
            Expr::Column(c) => outputs.iter().position(|(name, _)| *name == c.name).or_else(|| {
                let wanted = output_of(&s.expr).ok()?;
                outputs.iter().position(|(_, o)| *o == wanted)
            }),
            e => output_of(e)
                .ok()
                .and_then(|wanted| outputs.iter().position(|(_, o)| *o == wanted)),
        };
        match position {
            Some(i) => order.push((i, s.asc)),
            None => return Err(refuse("ordering", "ORDER BY output columns")),
        }
    }
    Ok(Some(AnalystQuery {
        table,
        predicate: predicate.map(unqualified),
        cell,
        groups,
        outputs,
        having: conditions,
        order,
        limit,
    }))
}

/// What an analyst's query released.
pub struct Answer {
    /// The rows.
    pub batch: RecordBatch,
    /// Per released column: the half-width of its 95 % interval (0 when exact).
    pub ci95: Vec<(String, u64)>,
    /// ε spent (0 when asked before today).
    pub epsilon_spent: f64,
}

fn number(column: &ArrayRef, row: usize) -> f64 {
    if column.is_null(row) {
        return 0.0;
    }
    arrow::compute::cast(column, &DataType::Float64)
        .ok()
        .and_then(|c| c.as_any().downcast_ref::<Float64Array>().map(|a| a.value(row)))
        .unwrap_or(0.0)
}

fn compare(v: f64, op: Operator, limit: f64) -> bool {
    match op {
        Operator::Eq => v == limit,
        Operator::NotEq => v != limit,
        Operator::Lt => v < limit,
        Operator::LtEq => v <= limit,
        Operator::Gt => v > limit,
        _ => v >= limit,
    }
}

fn hidden(e: datafusion::error::DataFusionError) -> ApiError {
    // the message could quote a stored value (a failed cast, say): it goes to the log only
    tracing::warn!(error = %e, "an analyst query failed while running");
    ApiError::BadRequest(
        "the query failed while running; the details are not shown to analysts (they could quote stored values)".into(),
    )
}

impl AnalystQuery {
    /// The sums released: in the output, or compared by `HAVING` (which answers a question
    /// about them too), each once.
    fn released_sums(&self) -> BTreeSet<String> {
        self.outputs
            .iter()
            .filter_map(|(_, o)| match o {
                Output::Number(n @ Released::Sum(_)) => Some(n.measure()),
                _ => None,
            })
            .chain(self.having.iter().filter_map(|(n, _, _)| match n {
                Released::Sum(_) => Some(n.measure()),
                Released::Visitors => None,
            }))
            .collect()
    }

    /// The canonical text of the question asked at `now`, for the budget: asked again it
    /// costs nothing (within the hour while it reaches into the last 48 hours, else that day).
    pub fn identity(&self, now: DateTime<Utc>) -> String {
        let measures: Vec<String> = self.released_sums().into_iter().collect();
        let groups: Vec<String> = self.groups.iter().map(|(g, _)| format!("{g:?}")).collect();
        let question = format!(
            "sql|{}|groups={}|measures={}",
            String::from_utf8_lossy(&self.cell.identity("*")),
            groups.join(","),
            measures.join(",")
        );
        let unsettled = self.cell.hours().reaches_after(now, super::UNSETTLED_HOURS);
        super::budget_identity(question, unsettled, now)
    }

    /// Released measures: the sums in the output or in `HAVING`, and the visitor count the
    /// threshold reads.
    pub fn measures_released(&self) -> usize {
        1 + self.released_sums().len()
    }

    /// Computes the groups and releases them through `release` with `mechanism`.
    pub async fn run(
        &self,
        ctx: &SessionContext,
        release: &Release,
        mechanism: Mechanism,
        max_rows: usize,
        now: DateTime<Utc>,
    ) -> Result<Answer, ApiError> {
        use datafusion::functions_aggregate::expr_fn::sum;
        use datafusion::prelude::col;
        let merge = ctx.udaf("hll_merge").map_err(|_| ApiError::Internal)?;
        let estimate = ctx.udf("hll_estimate").map_err(|_| ApiError::Internal)?;
        let mut df = ctx.table(self.table.as_str()).await.map_err(|e| {
            tracing::error!(error = %e, "analyst query: table");
            ApiError::Unavailable(format!(
                "no `{}` yet: the processor writes it with the first events",
                self.table
            ))
        })?;
        let extent = super::extent::Extent::of(&self.table, df.schema().as_arrow());
        if let Some(p) = &self.predicate {
            df = df
                .filter(p.clone())
                .map_err(|e| refuse("dimension filters", e.strip_backtrace()))?;
        }
        let sums: Vec<String> = self
            .outputs
            .iter()
            .filter_map(|(_, o)| match o {
                Output::Number(Released::Sum(m)) => Some(m.clone()),
                _ => None,
            })
            .chain(self.having.iter().filter_map(|(n, _, _)| match n {
                Released::Sum(m) => Some(m.clone()),
                Released::Visitors => None,
            }))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut aggregates: Vec<Expr> = sums
            .iter()
            .map(|m| sum(col(m.as_str())).alias(format!("sum_{m}")))
            .collect();
        aggregates.push(
            estimate
                .call(vec![merge.call(vec![col("visitors")])])
                .alias("__visitors"),
        );
        // what the rows of each group hold: their canonical cell, whatever the question's words
        aggregates.extend(extent.exprs("__e_")?);
        let group_exprs: Vec<Expr> = self
            .groups
            .iter()
            .enumerate()
            .map(|(i, (_, e))| e.clone().alias(format!("__g{i}")))
            .collect();
        let batches = df
            .aggregate(group_exprs, aggregates)
            .map_err(|e| refuse("one aggregation of one rollup", e.strip_backtrace()))?
            .collect()
            .await
            .map_err(hidden)?;
        let all = arrow::compute::concat_batches(
            &batches
                .first()
                .map(|b| b.schema())
                .unwrap_or_else(|| Arc::new(Schema::empty())),
            &batches,
        )
        .map_err(|_| ApiError::Internal)?;

        // release every group as a cell; drop those under the threshold
        struct Row {
            source: usize,
            numbers: Vec<Option<super::Released>>,
        }
        let mut rows = Vec::new();
        for r in 0..all.num_rows() {
            let cell = extent.cell(&all, r, "__e_")?;
            let value_of = |name: &str| all.column_by_name(name).map(|c| number(c, r)).unwrap_or(0.0);
            let visitors = release.release(mechanism, &cell, "visitors", value_of("__visitors"), now);
            if (visitors.value as u64) < release.min_visitors() {
                continue;
            }
            let released = |n: &Released| match n {
                Released::Visitors => visitors,
                Released::Sum(m) => release.release(mechanism, &cell, &n.measure(), value_of(&format!("sum_{m}")), now),
            };
            if !self
                .having
                .iter()
                .all(|(n, op, limit)| compare(released(n).value as f64, *op, *limit))
            {
                continue;
            }
            let numbers = self
                .outputs
                .iter()
                .map(|(_, o)| match o {
                    Output::Number(n) => Some(released(n)),
                    Output::Group(_) => None,
                })
                .collect();
            rows.push(Row { source: r, numbers });
        }

        // the answer's columns
        let take = UInt32Array::from(rows.iter().map(|r| r.source as u32).collect::<Vec<_>>());
        let mut fields = Vec::new();
        let mut columns: Vec<ArrayRef> = Vec::new();
        let mut ci95 = Vec::new();
        for (k, (name, output)) in self.outputs.iter().enumerate() {
            match output {
                Output::Group(i) => {
                    let source = all.column_by_name(&format!("__g{i}")).ok_or(ApiError::Internal)?;
                    let taken = arrow::compute::take(source, &take, None).map_err(|_| ApiError::Internal)?;
                    fields.push(Field::new(name, taken.data_type().clone(), true));
                    columns.push(taken);
                }
                Output::Number(n) => {
                    fields.push(Field::new(name, DataType::Int64, true));
                    columns.push(Arc::new(Int64Array::from(
                        rows.iter().map(|r| r.numbers[k].map(|v| v.value)).collect::<Vec<_>>(),
                    )));
                    let half = if mechanism == Mechanism::Noise {
                        release.distribution(&n.measure()).ci95()
                    } else {
                        0
                    };
                    ci95.push((name.clone(), half));
                }
            }
        }
        let schema: SchemaRef = Arc::new(Schema::new(fields));
        let mut batch = RecordBatch::try_new(schema, columns).map_err(|_| ApiError::Internal)?;
        if !self.order.is_empty() && batch.num_rows() > 1 {
            let sort: Vec<arrow::compute::SortColumn> = self
                .order
                .iter()
                .map(|(i, asc)| arrow::compute::SortColumn {
                    values: batch.column(*i).clone(),
                    options: Some(arrow::compute::SortOptions {
                        descending: !asc,
                        nulls_first: false,
                    }),
                })
                .collect();
            let indices = arrow::compute::lexsort_to_indices(&sort, None).map_err(|_| ApiError::Internal)?;
            batch = arrow::compute::take_record_batch(&batch, &indices).map_err(|_| ApiError::Internal)?;
        }
        let keep = self.limit.unwrap_or(usize::MAX).min(max_rows);
        if batch.num_rows() > keep {
            batch = batch.slice(0, keep);
        }
        Ok(Answer {
            batch,
            ci95,
            epsilon_spent: 0.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instant_bound_to_a_parameter_filters_hours_as_its_text_would() {
        // psycopg 3 and asyncpg bind a datetime as a timestamp, not as text
        for (micros, tz) in [
            (1_577_836_800_000_000, Some("UTC".into())),
            (1_577_838_600_500_000, None),
        ] {
            let bound = Expr::Literal(ScalarValue::TimestampMicrosecond(Some(micros), tz), None);
            let text = literal_text(&bound).unwrap_or_default();
            let hours = time_range("hour", Operator::GtEq, &text);
            let expected = micros.div_euclid(3_600_000_000) + i64::from(micros % 3_600_000_000 != 0);
            assert_eq!(hours.map(|h| h.start), Some(expected), "{text}");
        }
    }
    use datafusion::datasource::MemTable;

    async fn session() -> SessionContext {
        let ctx =
            SessionContext::new_with_config(datafusion::prelude::SessionConfig::new().with_information_schema(true));
        crate::sketches::register(&ctx);
        for (name, schema) in marsad_schemas::TableName::ROLLUPS.map(|t| (t.as_str(), t.schema())) {
            let table = MemTable::try_new(schema, vec![vec![]]).expect("table");
            ctx.register_table(name, Arc::new(table)).expect("register");
        }
        let events = MemTable::try_new(marsad_schemas::events_schema(), vec![vec![]]).expect("table");
        ctx.register_table("events", Arc::new(events)).expect("register");
        ctx
    }

    const ROLLUPS: [&str; 7] = marsad_schemas::TableName::ROLLUP_NAMES;

    async fn verdict(sql: &str) -> Result<Option<AnalystQuery>, String> {
        let ctx = session().await;
        let plan = ctx.state().create_logical_plan(sql).await.map_err(|e| e.to_string())?;
        check(&plan, &ROLLUPS).map_err(|e| e.to_string())
    }

    /// Every refused shape, with the rule its refusal must name.
    #[tokio::test]
    async fn refused_shapes_name_their_rule() {
        for (sql, rule) in [
            ("SELECT * FROM traffic_hourly", "one aggregation of one rollup"),
            (
                "SELECT country, events FROM traffic_hourly",
                "one aggregation of one rollup",
            ),
            ("SELECT count(*) FROM events", "rollups only"),
            (
                "SELECT sum(events) FROM traffic_hourly WHERE CAST(hour AS DATE) <= '2026-11-10'",
                "dimension filters",
            ),
            (
                "SELECT date_trunc('hour', date), sum(events) FROM traffic_hourly GROUP BY date_trunc('hour', date)",
                "grouping",
            ),
            (
                "SELECT country, hll_merge(visitors) FROM traffic_hourly GROUP BY country",
                "no sketches",
            ),
            (
                "SELECT country, max(events) FROM traffic_hourly GROUP BY country",
                "released aggregates",
            ),
            (
                "SELECT country, count(*) FROM traffic_hourly GROUP BY country",
                "released aggregates",
            ),
            (
                "SELECT country, sum(events) * 2 FROM traffic_hourly GROUP BY country",
                "released aggregates",
            ),
            (
                "SELECT sum(CASE WHEN country = 'IQ' THEN events ELSE 0 END) FROM traffic_hourly",
                "released aggregates",
            ),
            (
                "SELECT sum(events) FROM traffic_hourly WHERE country <> 'IQ'",
                "dimension filters",
            ),
            (
                "SELECT sum(events) FROM traffic_hourly WHERE country = 'IQ' OR country = 'JO'",
                "dimension filters",
            ),
            (
                "SELECT sum(events) FROM traffic_hourly WHERE sessions > 3",
                "dimension filters",
            ),
            (
                "SELECT sum(events) FROM traffic_hourly WHERE country LIKE 'I%'",
                "dimension filters",
            ),
            (
                "SELECT country, sum(events) FROM traffic_hourly GROUP BY country HAVING sum(sessions) > 0 OR sum(events) > 3",
                "having",
            ),
            (
                "SELECT country, sum(events) FROM traffic_hourly GROUP BY country HAVING max(events) > 3",
                "released aggregates",
            ),
            (
                "SELECT a.country, sum(a.events) FROM traffic_hourly a JOIN traffic_hourly b ON a.country = b.country GROUP BY a.country",
                "one aggregation of one rollup",
            ),
            (
                "SELECT country, sum(events) FROM traffic_hourly GROUP BY country UNION ALL SELECT 'x', 1",
                "one aggregation of one rollup",
            ),
            (
                "SELECT country, sum(sum(events)) OVER () FROM traffic_hourly GROUP BY country",
                "one aggregation of one rollup",
            ),
            (
                "SELECT sum(events) FROM traffic_hourly WHERE country IN (SELECT country FROM traffic_hourly)",
                "one aggregation of one rollup",
            ),
            (
                "SELECT c, sum(events) FROM (SELECT country AS c, events, visitors FROM traffic_hourly) t GROUP BY c",
                "one aggregation of one rollup",
            ),
            (
                "SELECT DISTINCT country FROM traffic_hourly",
                "one aggregation of one rollup",
            ),
        ] {
            match verdict(sql).await {
                Ok(_) => panic!("{sql} should be refused"),
                Err(e) => assert!(
                    e.contains(&format!("rule `{rule}`")) || e.contains("subqueries"),
                    "{sql}: `{e}` should name the rule `{rule}`"
                ),
            }
        }
    }

    #[tokio::test]
    async fn allowed_shapes_pass() {
        for sql in [
            "SELECT country, sum(events) FROM traffic_hourly GROUP BY country",
            "SELECT sum(events) FROM traffic_hourly",
            "SELECT country, round(hll_estimate(hll_merge(visitors))) AS v FROM traffic_hourly \
             WHERE date >= '2026-11-01' AND date <= '2026-11-30' AND device_type IN ('mobile', 'tablet') \
             GROUP BY country HAVING sum(events) > 100 ORDER BY v DESC LIMIT 3",
            "SELECT date_trunc('day', hour) AS day, sum(events) FROM traffic_hourly WHERE date BETWEEN '2026-11-01' AND '2026-11-07' GROUP BY 1 ORDER BY 1",
            "SELECT campaign_id, sum(impressions), sum(clicks) FROM ad_performance_hourly WHERE campaign_id = 'cmp-1' GROUP BY campaign_id",
            "SELECT channel, sum(sessions), sum(bounces) FROM sources_hourly WHERE utm_campaign = 'nov' GROUP BY channel",
            "SELECT page_path, sum(entries), sum(exits) FROM pages_hourly GROUP BY page_path ORDER BY 2 DESC LIMIT 10",
        ] {
            let q = verdict(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert!(q.is_some(), "{sql}");
        }
        assert!(
            verdict("SELECT table_name FROM information_schema.tables")
                .await
                .is_ok_and(|q| q.is_none()),
            "catalog questions are answered as they are"
        );
    }

    #[tokio::test]
    async fn a_filter_and_a_group_reach_the_same_cell() {
        let q = |sql: &'static str| async move { verdict(sql).await.ok().flatten().map(|q| q.cell) };
        let by_filter = q("SELECT sum(events) FROM traffic_hourly WHERE country = 'IQ' AND date BETWEEN '2026-11-01' AND '2026-11-30'")
            .await
            .expect("checked");
        let grouped = q("SELECT country, sum(events) FROM traffic_hourly WHERE date >= '2026-11-01' AND date <= '2026-11-30' GROUP BY country")
            .await
            .expect("checked")
            .with_value("country", Some("IQ"));
        assert_eq!(by_filter.identity("sum(events)"), grouped.identity("sum(events)"));
    }
}
