//! Read-only SQL: statements that would change anything are refused before
//! planning finishes; results are capped and rendered as JSON, NDJSON or CSV.

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::common::ParamValues;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{DataFrame, SessionContext};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::release::{Mechanism, Release};

/// Output formats of `/v1/sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"columns":[…],"rows":[{…}],"row_count":n,"truncated":b}`
    Json,
    /// One JSON object per line.
    Ndjson,
    /// CSV with a header line.
    Csv,
}

impl Format {
    /// Parses `?format=`.
    pub fn parse(name: Option<&str>) -> Result<Self, ApiError> {
        match name.unwrap_or("json") {
            "json" => Ok(Format::Json),
            "ndjson" => Ok(Format::Ndjson),
            "csv" => Ok(Format::Csv),
            other => Err(ApiError::BadRequest(format!(
                "unknown format `{other}`; use json, ndjson or csv"
            ))),
        }
    }

    /// The response's content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Ndjson => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8",
        }
    }
}

/// Who is asking, and so what a query may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Engineers: every table, raw rows.
    Everything,
    /// Analysts: aggregates of the rollups only, every number released by `mechanism`,
    /// spending from the budget of the key `key`.
    Released {
        /// The key's name (whose budget pays).
        key: String,
        /// How the numbers are protected.
        mechanism: Mechanism,
    },
}

/// How exact a released answer is.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseInfo {
    /// The mechanism.
    pub mechanism: Mechanism,
    /// Per released column, the half-width of its 95 % interval.
    pub ci95: Vec<(String, u64)>,
    /// ε this answer spent (0 when asked before today).
    pub epsilon_spent: f64,
}

/// A query's rows, capped.
pub struct QueryResult {
    /// The result schema.
    pub schema: SchemaRef,
    /// The rows (at most the cap).
    pub batches: Vec<RecordBatch>,
    /// Whether rows beyond the cap were dropped.
    pub truncated: bool,
    /// How exact the numbers are, for analysts' answers.
    pub release: Option<ReleaseInfo>,
}

/// Whether a spreadsheet would run a text cell as a formula (or a DDE command).
pub fn starts_formula(text: &str) -> bool {
    matches!(text.as_bytes().first(), Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r'))
}

/// The batch with every text cell that would start a spreadsheet formula prefixed with `'`,
/// for CSV: campaign ids and page paths come from the public ingest.
pub fn defuse_formulas(batch: &RecordBatch) -> Result<RecordBatch, ApiError> {
    use arrow::array::{Array, ArrayRef, StringArray};
    use arrow::datatypes::DataType;
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
    let mut fields = Vec::with_capacity(batch.num_columns());
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        if !matches!(
            field.data_type(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ) {
            columns.push(column.clone());
            fields.push(field.as_ref().clone());
            continue;
        }
        let text = arrow::compute::cast(column, &DataType::Utf8).map_err(|_| ApiError::Internal)?;
        let text = text.as_any().downcast_ref::<StringArray>().ok_or(ApiError::Internal)?;
        if !text.iter().flatten().any(starts_formula) {
            columns.push(column.clone());
            fields.push(field.as_ref().clone());
            continue;
        }
        let defused: StringArray = text
            .iter()
            .map(|v| {
                v.map(|t| {
                    if starts_formula(t) {
                        format!("'{t}")
                    } else {
                        t.to_owned()
                    }
                })
            })
            .collect();
        columns.push(std::sync::Arc::new(defused) as ArrayRef);
        fields.push(field.as_ref().clone().with_data_type(DataType::Utf8));
        debug_assert_eq!(columns.last().map(|c| c.len()), Some(batch.num_rows()));
    }
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(fields));
    RecordBatch::try_new(schema, columns).map_err(|_| ApiError::Internal)
}

/// A DataFusion error as the client should see it.
pub fn user_error(e: DataFusionError) -> ApiError {
    let message = e.strip_backtrace();
    match e.find_root() {
        DataFusionError::ResourcesExhausted(msg) => ApiError::BadRequest(format!(
            "the queries running now need more memory than the service allows them together \
             (query.memory_limit_mb); filter or aggregate more, ask for fewer columns, or retry later: {msg}"
        )),
        DataFusionError::Plan(msg) if msg.contains("not supported") => {
            ApiError::BadRequest(format!("the SQL endpoint is read-only: {msg}"))
        }
        DataFusionError::Plan(_)
        | DataFusionError::SQL(..)
        | DataFusionError::SchemaError(..)
        | DataFusionError::NotImplemented(_)
        | DataFusionError::Execution(_)
        | DataFusionError::ArrowError(..) => ApiError::BadRequest(message),
        _ => {
            tracing::error!(error = %message, "query failed");
            ApiError::Internal
        }
    }
}

/// Plans `sql` read-only (DDL, DML and statements refused) for a caller who may read every
/// table, and runs it as a stream of batches: how exports of any size run in bounded memory.
pub async fn stream(
    ctx: &SessionContext,
    sql: &str,
) -> Result<datafusion::execution::SendableRecordBatchStream, ApiError> {
    if sql.trim().is_empty() {
        return Err(ApiError::BadRequest("empty SQL".into()));
    }
    let df = plan(ctx, sql, read_only()).await?;
    df.execute_stream().await.map_err(user_error)
}

/// Plans `sql` as `options` allow, parsing it within a bounded number of steps
/// ([`crate::bounded_dialect`]): what `SessionContext::sql_with_options` does, minus the runaway.
pub async fn plan(ctx: &SessionContext, sql: &str, options: SQLOptions) -> Result<DataFrame, ApiError> {
    let state = ctx.state();
    let statement = crate::bounded_dialect::parse_statement(sql, &state)?;
    let plan = state.statement_to_plan(statement).await.map_err(user_error)?;
    options.verify_plan(&plan).map_err(user_error)?;
    // a read-only plan runs as a frame over the state it was planned in (a session's state
    // is a deep copy: one per query is enough)
    Ok(DataFrame::new(state, plan))
}

/// How an analyst's answer to a query of `schema` is typed: released numbers are integers (a
/// visitor estimate too), possibly withheld. Protocols that describe a result before running
/// it (Postgres, Flight SQL) describe it so, or a client reading binary rows would misread them.
pub fn released_schema(schema: &SchemaRef) -> SchemaRef {
    let fields: Vec<arrow::datatypes::FieldRef> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            arrow::datatypes::DataType::Float64
            | arrow::datatypes::DataType::Float32
            | arrow::datatypes::DataType::Int64 => std::sync::Arc::new(
                f.as_ref()
                    .clone()
                    .with_data_type(arrow::datatypes::DataType::Int64)
                    .with_nullable(true),
            ),
            _ => f.clone(),
        })
        .collect();
    std::sync::Arc::new(arrow::datatypes::Schema::new(fields))
}

/// What the SQL endpoints allow: reading, nothing else.
pub fn read_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// Plans and runs `sql` read-only for an engineer, keeping at most `max_rows` rows.
pub async fn run(ctx: &SessionContext, sql: &str, max_rows: usize) -> Result<QueryResult, ApiError> {
    run_with_params(ctx, sql, None, max_rows, &Access::Everything, None).await
}

/// [`run`] as `access` allows, with values for the statement's `$1`, `$2`, … (prepared
/// statements of the Postgres protocol); analysts' answers go through `release`.
pub async fn run_with_params(
    ctx: &SessionContext,
    sql: &str,
    params: Option<ParamValues>,
    max_rows: usize,
    access: &Access,
    release: Option<&Release>,
) -> Result<QueryResult, ApiError> {
    if sql.trim().is_empty() {
        return Err(ApiError::BadRequest("empty SQL".into()));
    }
    let mut df = plan(ctx, sql, read_only()).await?;
    if let Some(params) = params {
        df = df.with_param_values(params).map_err(user_error)?;
    }
    if let (Access::Released { key, mechanism }, Some(release)) = (access, release)
        && let Some(query) = crate::release::analyst_sql::check(df.logical_plan(), &ROLLUPS)?
    {
        let now = chrono::Utc::now();
        // exact numbers (threshold-only, internal use) spend nothing, as with reports
        let spent = if *mechanism == crate::release::Mechanism::Noise {
            release.charge(key, &query.identity(now), query.measures_released(), now)?
        } else {
            0.0
        };
        let answer = query.run(ctx, release, *mechanism, max_rows, now).await?;
        return Ok(QueryResult {
            schema: answer.batch.schema(),
            batches: vec![answer.batch],
            truncated: false,
            release: Some(ReleaseInfo {
                mechanism: *mechanism,
                ci95: answer.ci95,
                epsilon_spent: spent,
            }),
        });
    }
    if matches!(access, Access::Released { .. }) && release.is_none() {
        return Err(ApiError::Internal);
    }
    // an engineer's query, or an analyst's question about the catalog
    let schema: SchemaRef = df.schema().inner().clone();
    // an EXPLAIN must stay the root of its plan (its few rows are cut below like any others)
    let explains = matches!(
        df.logical_plan(),
        datafusion::logical_expr::LogicalPlan::Explain(_) | datafusion::logical_expr::LogicalPlan::Analyze(_)
    );
    let df = if explains {
        df
    } else {
        df.limit(0, Some(max_rows + 1)).map_err(user_error)?
    };
    let mut batches = df.collect().await.map_err(user_error)?;
    let fetched: usize = batches.iter().map(|b| b.num_rows()).sum();
    let truncated = fetched > max_rows;
    if truncated {
        let mut keep = max_rows;
        for b in batches.iter_mut() {
            let n = b.num_rows().min(keep);
            *b = b.slice(0, n);
            keep -= n;
        }
    }
    Ok(QueryResult {
        schema,
        batches,
        truncated,
        release: None,
    })
}

/// The tables analysts may read.
const ROLLUPS: [&str; 7] = marsad_schemas::TableName::ROLLUP_NAMES;

fn json_rows(batches: &[RecordBatch]) -> Result<Vec<Value>, ApiError> {
    let mut writer = arrow::json::ArrayWriter::new(Vec::new());
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    writer
        .write_batches(&refs)
        .map_err(|e| ApiError::BadRequest(format!("cannot render the result as JSON: {e}")))?;
    writer
        .finish()
        .map_err(|e| ApiError::BadRequest(format!("cannot render the result as JSON: {e}")))?;
    let bytes = writer.into_inner();
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("cannot render the result as JSON: {e}")))
}

/// Renders a result in `format`.
pub fn render(result: &QueryResult, format: Format) -> Result<Vec<u8>, ApiError> {
    match format {
        Format::Json => {
            let rows = json_rows(&result.batches)?;
            let columns: Vec<Value> = result
                .schema
                .fields()
                .iter()
                .map(|f| json!({"name": f.name(), "type": f.data_type().to_string()}))
                .collect();
            let mut body = json!({"columns": columns, "rows": rows, "row_count": rows.len(),
                "truncated": result.truncated});
            if let Some(r) = &result.release {
                body["release"] = json!({
                    "mechanism": r.mechanism,
                    "ci95": r.ci95.iter().map(|(c, w)| (c.clone(), json!(w))).collect::<serde_json::Map<_, _>>(),
                    "epsilon_spent": r.epsilon_spent,
                });
            }
            serde_json::to_vec(&body).map_err(|_| ApiError::Internal)
        }
        Format::Ndjson => {
            let mut out = Vec::new();
            for row in json_rows(&result.batches)? {
                serde_json::to_writer(&mut out, &row).map_err(|_| ApiError::Internal)?;
                out.push(b'\n');
            }
            Ok(out)
        }
        Format::Csv => {
            let mut out = Vec::new();
            {
                let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(&mut out);
                if result.batches.is_empty() {
                    let empty = RecordBatch::new_empty(result.schema.clone());
                    w.write(&empty).map_err(|e| ApiError::BadRequest(e.to_string()))?;
                }
                for b in &result.batches {
                    w.write(&defuse_formulas(b)?)
                        .map_err(|e| ApiError::BadRequest(format!("cannot render the result as CSV: {e}")))?;
                }
            }
            Ok(out)
        }
    }
}
