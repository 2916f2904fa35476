//! Analyst SQL under the k rule: analysts may only aggregate the rollups, and
//! every answer row that counts fewer than k unique visitors is withheld, with
//! complementary rows, exactly as in the reports.
//!
//! Only query shapes whose every output row is one group of an aggregate are
//! accepted, so the rule is checked per row: one `GROUP BY` (or global
//! aggregate) over one rollup table, aggregates limited to `sum`, `count`,
//! `avg` and the sketch functions over plain columns, no `FILTER`, no joins,
//! unions, windows or subqueries. A `CASE` inside an aggregate or a
//! `FILTER (WHERE …)` could count a sub-group smaller than the row's own group,
//! so they are refused rather than checked.

use std::sync::Arc;

use arrow::array::{Array, BooleanArray, Float64Array, RecordBatch};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan, Projection};
use datafusion::prelude::SessionContext;

use crate::error::ApiError;

/// The hidden per-row sketch of the row's visitors added to an analyst's aggregate.
const CELL_SKETCH: &str = "__marsad_cell_sketch";
/// Its estimate, computed at the top of the plan and removed before the answer leaves.
const CELL_VISITORS: &str = "__marsad_cell_visitors";
/// The column of every rollup holding its visitors sketch.
const VISITORS: &str = "visitors";
/// Aggregates whose result for a group depends on the whole group only.
const ALLOWED_AGGREGATES: [&str; 6] = ["sum", "count", "avg", "mean", "hll_merge", "hll_estimate"];

fn refuse(why: impl Into<String>) -> ApiError {
    ApiError::BadRequest(format!(
        "analyst SQL must aggregate one rollup table (GROUP BY over traffic_hourly, ad_performance_hourly \
         or demographics_daily): {}",
        why.into()
    ))
}

fn has_subquery(expr: &Expr) -> bool {
    expr.exists(|e| {
        Ok(matches!(
            e,
            Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_) | Expr::SetComparison(_)
        ))
    })
    .unwrap_or(true)
}

fn strip(expr: &Expr) -> &Expr {
    match expr {
        Expr::Alias(a) => strip(&a.expr),
        Expr::Cast(c) => strip(&c.expr),
        Expr::TryCast(c) => strip(&c.expr),
        other => other,
    }
}

fn check_aggregate_expr(expr: &Expr) -> Result<(), ApiError> {
    let Expr::AggregateFunction(AggregateFunction { func, params }) = strip(expr) else {
        return Err(refuse(format!("`{expr}` is not an aggregate")));
    };
    let name = func.name().to_ascii_lowercase();
    if !ALLOWED_AGGREGATES.contains(&name.as_str()) {
        return Err(refuse(format!(
            "the aggregate `{name}` is not allowed; use sum, count, avg, hll_merge or hll_estimate"
        )));
    }
    if params.filter.is_some() {
        return Err(refuse("FILTER (WHERE …) on an aggregate is not allowed; use WHERE"));
    }
    for arg in &params.args {
        if !matches!(strip(arg), Expr::Column(_) | Expr::Literal(..)) {
            return Err(refuse(format!(
                "aggregate arguments must be plain columns, not `{arg}`; put conditions in WHERE"
            )));
        }
    }
    Ok(())
}

/// What lies under the aggregate: only filters, aliases and the scan of one table.
fn check_aggregate_input(plan: &LogicalPlan) -> Result<(), ApiError> {
    match plan {
        LogicalPlan::TableScan(scan) => {
            if scan.source.schema().field_with_name(VISITORS).is_err() {
                return Err(refuse(format!("`{}` is not a rollup table", scan.table_name)));
            }
            Ok(())
        }
        LogicalPlan::Filter(f) => {
            if has_subquery(&f.predicate) {
                return Err(refuse("subqueries are not allowed"));
            }
            check_aggregate_input(&f.input)
        }
        LogicalPlan::SubqueryAlias(a) => check_aggregate_input(&a.input),
        LogicalPlan::Projection(p) => {
            if !p.expr.iter().all(|e| matches!(strip(e), Expr::Column(_))) {
                return Err(refuse("a subquery under the aggregate may only select plain columns"));
            }
            if p.schema.field_with_unqualified_name(VISITORS).is_err() {
                return Err(refuse("a subquery under the aggregate must keep the `visitors` column"));
            }
            check_aggregate_input(&p.input)
        }
        other => Err(refuse(format!("`{}` is not allowed", other.display()))),
    }
}

/// Schemas that describe tables and hold no visitor's data.
const CATALOG_SCHEMAS: [&str; 2] = ["information_schema", "pg_catalog"];

/// Whether every table `plan` reads is catalog metadata (what BI tools ask before they query),
/// so any shape is fine: a session only lists the tables its role may read.
fn reads_only_catalog(plan: &LogicalPlan) -> bool {
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

/// Checks the shape of an analyst's plan; `Ok(true)` if it reads the rollups
/// (so the k rule applies), `Ok(false)` if it reads only catalog metadata.
fn check(plan: &LogicalPlan) -> Result<bool, ApiError> {
    let mut aggregates = 0;
    let mut scans_data = false;
    let mut bad: Option<ApiError> = None;
    plan.apply(|node| {
        match node {
            LogicalPlan::Aggregate(agg) => {
                aggregates += 1;
                for e in agg.aggr_expr.iter() {
                    if let Err(e) = check_aggregate_expr(e) {
                        bad = Some(e);
                        return Ok(TreeNodeRecursion::Stop);
                    }
                }
                if agg.group_expr.iter().any(has_subquery) {
                    bad = Some(refuse("subqueries are not allowed"));
                    return Ok(TreeNodeRecursion::Stop);
                }
                if let Err(e) = check_aggregate_input(&agg.input) {
                    bad = Some(e);
                    return Ok(TreeNodeRecursion::Stop);
                }
                scans_data = true;
                return Ok(TreeNodeRecursion::Jump);
            }
            LogicalPlan::TableScan(scan) => {
                if !scan.table_name.schema().is_some_and(|s| CATALOG_SCHEMAS.contains(&s)) {
                    bad = Some(refuse(format!("`{}` is read without GROUP BY", scan.table_name)));
                    return Ok(TreeNodeRecursion::Stop);
                }
            }
            LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::SubqueryAlias(_) => {}
            other => {
                bad = Some(refuse(format!(
                    "`{}` is not allowed",
                    other.display().to_string().split(':').next().unwrap_or("this operator")
                )));
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        if node.expressions().iter().any(has_subquery) {
            bad = Some(refuse("subqueries are not allowed"));
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if let Some(e) = bad {
        return Err(e);
    }
    if aggregates > 1 {
        return Err(refuse("only one aggregation per query"));
    }
    Ok(scans_data)
}

fn plan_error(e: datafusion::error::DataFusionError) -> ApiError {
    tracing::error!(error = %e, "could not add the small-cell check to a plan");
    ApiError::Internal
}

/// Checks an analyst's plan and returns it with a last column, the estimated
/// unique visitors of each row, for [`withhold_small_cells`]; `None` if the
/// plan reads only catalog metadata (no visitor is counted, nothing to withhold).
pub fn restrict(ctx: &SessionContext, plan: LogicalPlan) -> Result<Option<LogicalPlan>, ApiError> {
    if reads_only_catalog(&plan) || !check(&plan)? {
        return Ok(None);
    }
    let merge = ctx.udaf("hll_merge").map_err(|_| ApiError::Internal)?;
    let estimate = ctx.udf("hll_estimate").map_err(|_| ApiError::Internal)?;
    let rewritten = plan
        .transform_up(|node| match node {
            LogicalPlan::Aggregate(agg) => {
                let schema: &DFSchema = agg.input.schema();
                let (qualifier, field) = schema
                    .qualified_field_with_unqualified_name(VISITORS)
                    .map_err(|e| e.context("the rollup has no visitors column"))?;
                let visitors = Expr::Column(Column::from((qualifier, field)));
                let mut aggr_expr = agg.aggr_expr.clone();
                aggr_expr.push(merge.call(vec![visitors]).alias(CELL_SKETCH));
                let rebuilt = Aggregate::try_new(agg.input.clone(), agg.group_expr.clone(), aggr_expr)?;
                Ok(Transformed::yes(LogicalPlan::Aggregate(rebuilt)))
            }
            LogicalPlan::Projection(p) if p.input.schema().has_column_with_unqualified_name(CELL_SKETCH) => {
                let mut expr = p.expr.clone();
                expr.push(Expr::Column(Column::from_name(CELL_SKETCH)));
                Ok(Transformed::yes(LogicalPlan::Projection(Projection::try_new(
                    expr,
                    p.input.clone(),
                )?)))
            }
            other => Ok(Transformed::yes(other.recompute_schema()?)),
        })
        .map_err(plan_error)?
        .data;
    // on top: the original columns, then the row's visitors estimate
    let mut top: Vec<Expr> = rewritten
        .schema()
        .columns()
        .into_iter()
        .filter(|c| c.name != CELL_SKETCH)
        .map(Expr::Column)
        .collect();
    top.push(
        estimate
            .call(vec![Expr::Column(Column::from_name(CELL_SKETCH))])
            .alias(CELL_VISITORS),
    );
    let plan = Projection::try_new(top, Arc::new(rewritten)).map_err(plan_error)?;
    Ok(Some(LogicalPlan::Projection(plan)))
}

/// Removes the rows under `k` visitors (and complementary rows, as the reports
/// do) and the visitors column [`restrict`] added; returns how many rows were withheld.
pub fn withhold_small_cells(batches: &mut [RecordBatch], k: usize) -> Result<usize, ApiError> {
    let mut visitors = Vec::new();
    for b in batches.iter() {
        let column = b.column(b.num_columns() - 1);
        let Some(estimates) = column.as_any().downcast_ref::<Float64Array>() else {
            return Err(ApiError::Internal);
        };
        visitors.extend((0..estimates.len()).map(|i| if estimates.is_null(i) { 0.0 } else { estimates.value(i) }));
    }
    let total: f64 = visitors.iter().sum();
    let hidden = crate::reports::suppress(&visitors, total, k as f64);
    let withheld = hidden.iter().filter(|h| **h).count();
    let mut offset = 0;
    for b in batches.iter_mut() {
        let keep = BooleanArray::from(
            hidden[offset..offset + b.num_rows()]
                .iter()
                .map(|h| !h)
                .collect::<Vec<_>>(),
        );
        offset += b.num_rows();
        let filtered = arrow::compute::filter_record_batch(b, &keep).map_err(|_| ApiError::Internal)?;
        let last = filtered.num_columns() - 1;
        *b = filtered
            .project(&(0..last).collect::<Vec<_>>())
            .map_err(|_| ApiError::Internal)?;
    }
    Ok(withheld)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;

    async fn session() -> SessionContext {
        let ctx =
            SessionContext::new_with_config(datafusion::prelude::SessionConfig::new().with_information_schema(true));
        crate::sketches::register(&ctx);
        let schema = Arc::new(Schema::new(vec![
            Field::new("country", DataType::Utf8, true),
            Field::new("events", DataType::Int64, false),
            Field::new("visitors", DataType::Binary, false),
        ]));
        let table = MemTable::try_new(schema, vec![vec![]]).expect("table");
        ctx.register_table("traffic_hourly", Arc::new(table)).expect("register");
        let raw = Arc::new(Schema::new(vec![Field::new("visitor_key", DataType::Utf8, true)]));
        let table = MemTable::try_new(raw, vec![vec![]]).expect("table");
        ctx.register_table("events", Arc::new(table)).expect("register");
        ctx
    }

    async fn verdict(sql: &str) -> Result<bool, String> {
        let ctx = session().await;
        let plan = ctx.state().create_logical_plan(sql).await.map_err(|e| e.to_string())?;
        match restrict(&ctx, plan) {
            Ok(p) => Ok(p.is_some()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[tokio::test]
    async fn aggregates_of_a_rollup_pass_with_the_k_rule() {
        for sql in [
            "SELECT country, SUM(events) FROM traffic_hourly GROUP BY country",
            "SELECT country, hll_estimate(hll_merge(visitors)) AS v FROM traffic_hourly WHERE country <> 'JO' GROUP BY country ORDER BY v DESC LIMIT 3",
            "SELECT SUM(events) FROM traffic_hourly",
            "SELECT country FROM traffic_hourly GROUP BY country HAVING SUM(events) > 3",
            "SELECT c, SUM(events) FROM (SELECT country AS c, events, visitors FROM traffic_hourly) t GROUP BY c",
        ] {
            assert_eq!(verdict(sql).await, Ok(true), "{sql}");
        }
        assert_eq!(
            verdict("SELECT table_name FROM information_schema.tables").await,
            Ok(false)
        );
    }

    #[tokio::test]
    async fn shapes_that_could_single_out_a_visitor_are_refused() {
        for sql in [
            "SELECT * FROM traffic_hourly",
            "SELECT country, events FROM traffic_hourly WHERE country = 'EG'",
            "SELECT country, SUM(events) FILTER (WHERE country = 'EG') FROM traffic_hourly GROUP BY country",
            "SELECT SUM(CASE WHEN country = 'EG' THEN events ELSE 0 END) FROM traffic_hourly",
            "SELECT country, MAX(events) FROM traffic_hourly GROUP BY country",
            "SELECT country, SUM(SUM(events)) OVER () FROM traffic_hourly GROUP BY country",
            "SELECT SUM(events) FROM traffic_hourly WHERE country IN (SELECT country FROM traffic_hourly)",
            "SELECT a.country, SUM(a.events) FROM traffic_hourly a JOIN traffic_hourly b ON a.country = b.country GROUP BY a.country",
            "SELECT country, SUM(events) FROM traffic_hourly GROUP BY country UNION ALL SELECT 'x', 1",
            "SELECT COUNT(*) FROM events",
        ] {
            assert!(verdict(sql).await.is_err(), "{sql} should be refused");
        }
    }

    #[test]
    fn small_rows_and_their_complement_are_withheld() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("country", DataType::Utf8, true),
            Field::new(CELL_VISITORS, DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(arrow::array::StringArray::from(vec!["JO", "SA", "EG", "AE"])),
                Arc::new(Float64Array::from(vec![50.0, 20.0, 1.0, 30.0])),
            ],
        )
        .expect("batch");
        let mut batches = vec![batch];
        assert_eq!(withhold_small_cells(&mut batches, 10).expect("withheld"), 2);
        assert_eq!(batches[0].num_columns(), 1);
        let left = batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .expect("strings");
        assert_eq!(left.iter().flatten().collect::<Vec<_>>(), ["JO", "AE"]);
    }
}
