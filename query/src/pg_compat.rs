//! What Postgres clients ask beyond plain SQL, answered for Marsad's read-only tables: the
//! catalog functions their drivers and ORMs call on connect and when they reflect a table
//! (`version()`, `json_build_object`, `pg_get_serial_sequence`, …), and rewrites of the few
//! constructs their catalog queries use that DataFusion plans differently (`LIKE … ESCAPE '/'`,
//! `generate_subscripts`, the catalog's array columns kept as text). Nothing here reads data:
//! a rewrite only changes how a query is spelled, never which tables it reads.

use std::ops::ControlFlow;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, ListArray, StringArray};
use arrow::datatypes::{DataType, Field};
use datafusion::common::{Result as DfResult, ScalarValue, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility, create_udf,
};
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{
    BinaryOperator, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, ObjectName, Query, SelectItem,
    SetExpr, Statement, TableFactor, TableWithJoins, Value, Visit, Visitor, visit_expressions_mut,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use datafusion_pg_catalog::sql::rules::{RemoveSubqueryFromProjection, SqlStatementRewriteRule};

/// The Postgres version this server speaks, as `SHOW server_version` answers it.
pub const SERVER_VERSION: &str = "16.6";

/// Catalog columns that Postgres keeps as arrays (`int2vector`, `oid[]`, …) and the emulated
/// catalog keeps as their text form (`{1,2}` or `1 2`): clients unnest them to reflect keys
/// and indexes.
const TEXT_ARRAY_COLUMNS: &[&str] = &[
    "conkey",
    "confkey",
    "conpfeqop",
    "conppeqop",
    "conffeqop",
    "conexclop",
    "indkey",
    "indclass",
    "indoption",
    "indcollation",
];

/// The function that reads such a column as an array of integers.
const CATALOG_ARRAY: &str = "marsad_catalog_array";
/// The function that turns a `LIKE` pattern with another escape character into one escaped
/// with a backslash, the only escape DataFusion's `LIKE` takes.
const LIKE_ESCAPE: &str = "marsad_like_escape";

/// Registers the catalog functions clients call on `ctx` (a connection's session).
pub fn register_functions(ctx: &SessionContext) {
    ctx.register_udf(postgres_version());
    ctx.register_udf(pg_size_pretty());
    ctx.register_udf(ScalarUDF::new_from_impl(JsonBuildObject::default()));
    ctx.register_udf(catalog_array());
    ctx.register_udf(like_escape());
    // what Marsad does not keep: a Delta table's size is its files on object storage, its
    // tables have no comments, sequences, serial columns or index definitions
    for (name, arity, answer) in [
        ("pg_table_size", 1, ScalarValue::Int64(None)),
        ("obj_description", 2, ScalarValue::Utf8(None)),
        ("pg_get_serial_sequence", 2, ScalarValue::Utf8(None)),
        ("pg_get_indexdef", 3, ScalarValue::Utf8(None)),
        // every collation and type is visible: Marsad has one schema and defines neither
        ("pg_collation_is_visible", 1, ScalarValue::Boolean(Some(true))),
        ("pg_type_is_visible", 1, ScalarValue::Boolean(Some(true))),
    ] {
        ctx.register_udf(ScalarUDF::new_from_impl(Constant::new(name, arity, answer)));
    }
}

/// Parses what a Postgres client sent. Statements over the Postgres catalog get the
/// compatibility parser's rewrites; statements over Marsad's tables are parsed as written, the
/// way `/v1/sql` reads them: among those rewrites is one that answers NULL for a correlated
/// subquery in a column (DataFusion cannot run those the catalog's clients send), which over
/// `events` would be a wrong answer given silently.
pub fn parse(compat: &PostgresCompatibilityParser, sql: &str) -> Result<Vec<Statement>, ParserError> {
    let mut statements = compat.parse(sql)?;
    let as_written = parse_as_written(sql).filter(|w| w.len() == statements.len());
    if as_written.is_none() && statements.iter().any(names_marsad_tables) {
        // never the lenient parse for Marsad's tables: it could blank a column silently
        return Err(ParserError::ParserError(
            "this statement names Marsad's tables and does not parse as Postgres SQL".into(),
        ));
    }
    for (i, statement) in statements.iter_mut().enumerate() {
        match as_written.as_ref().and_then(|w| w.get(i)) {
            Some(written) if names_marsad_tables(written) => {
                *statement = written.clone();
                rewrite(statement);
            }
            _ => {
                rewrite(statement);
                fill_missing_catalog_columns(statement);
                // a catalog lookup the rewrites moved into a column answers NULL, as the
                // compatibility parser answers those it found there (none of them finds a
                // row for Marsad's tables: no defaults, identities, sequences or collations)
                *statement = RemoveSubqueryFromProjection.rewrite(statement.clone());
            }
        }
    }
    Ok(statements)
}

/// Catalog columns the emulated catalog lacks, with the value every Marsad table has there.
const MISSING_CATALOG_COLUMNS: &[(&str, &str)] = &[
    // no table has storage parameters (SQLAlchemy's index reflection reads them)
    ("reloptions", "CAST(NULL AS TEXT)"),
];

/// Whether a catalog column named `name` is a boolean (Postgres spells them `indis…`,
/// `relhas…`, …; `contype` and `relkind` are one-letter text, so the name decides, not the value).
fn is_boolean_catalog_column(name: &str) -> bool {
    const PREFIXES: &[&str] = &["indis", "relis", "relhas", "attis", "atthas", "conis", "typis"];
    const NAMES: &[&str] = &[
        "attnotnull",
        "indimmediate",
        "indnullsnotdistinct",
        "condeferrable",
        "condeferred",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p)) || NAMES.contains(&name)
}

/// Replaces the columns of [`MISSING_CATALOG_COLUMNS`] in a catalog query by their value, and
/// reads `'t'` / `'f'` compared with a boolean column as Postgres does (SQLAlchemy 1.4, which
/// Superset runs, writes `ix.indisprimary = 'f'`).
fn fill_missing_catalog_columns(statement: &mut Statement) {
    let _ = visit_expressions_mut(statement, |expr: &mut Expr| {
        if let Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq | BinaryOperator::NotEq,
            right,
        } = expr
        {
            let column = match left.as_ref() {
                Expr::Identifier(i) => Some(i),
                Expr::CompoundIdentifier(parts) => parts.last(),
                _ => None,
            };
            if column.is_some_and(|c| is_boolean_catalog_column(&c.value.to_ascii_lowercase()))
                && let Expr::Value(v) = right.as_mut()
                && let Value::SingleQuotedString(text) = &v.value
            {
                match text.to_ascii_lowercase().as_str() {
                    "t" | "true" => v.value = Value::Boolean(true),
                    "f" | "false" => v.value = Value::Boolean(false),
                    _ => {}
                }
            }
            return ControlFlow::<()>::Continue(());
        }
        let name = match &*expr {
            Expr::Identifier(i) => Some(i),
            Expr::CompoundIdentifier(parts) => parts.last(),
            _ => None,
        }
        .map(|i| i.value.to_ascii_lowercase());
        if let Some((_, value)) = MISSING_CATALOG_COLUMNS
            .iter()
            .find(|(c, _)| Some(*c) == name.as_deref())
            && let Some(e) = parse_expr(value)
        {
            *expr = e;
        }
        ControlFlow::<()>::Continue(())
    });
}

/// `sql` parsed as written (`ABORT` read as its synonym `ROLLBACK`, as the compatibility
/// parser reads it), or `None` when it does not parse.
fn parse_as_written(sql: &str) -> Option<Vec<Statement>> {
    use datafusion::sql::sqlparser::keywords::Keyword;
    use datafusion::sql::sqlparser::tokenizer::Token;
    let dialect = PostgreSqlDialect {};
    let tokens: Vec<_> = Parser::new(&dialect)
        .try_with_sql(sql)
        .ok()?
        .into_tokens()
        .into_iter()
        .map(|mut t| {
            if matches!(&t.token, Token::Word(w) if w.keyword == Keyword::ABORT) {
                t.token = Token::make_keyword("ROLLBACK");
            }
            t
        })
        .collect();
    Parser::new(&dialect)
        .with_tokens_with_locations(tokens)
        .parse_statements()
        .ok()
}

/// Whether `statement` reads a table that is not part of the Postgres catalog.
fn names_marsad_tables<V: Visit>(statement: &V) -> bool {
    #[derive(Default)]
    struct Relations {
        ctes: Vec<String>,
        tables: Vec<Vec<String>>,
    }
    impl Visitor for Relations {
        type Break = ();
        fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
            if let Some(with) = &query.with {
                // a CTE stands for the catalog only when it reads only the catalog itself
                // (`WITH events AS (SELECT … FROM events)` is Marsad's table by another way)
                self.ctes.extend(
                    with.cte_tables
                        .iter()
                        .filter(|c| !names_marsad_tables(c.query.as_ref()))
                        .map(|c| c.alias.name.value.to_ascii_lowercase()),
                );
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_relation(&mut self, name: &ObjectName) -> ControlFlow<()> {
            self.tables.push(
                name.0
                    .iter()
                    .filter_map(|p| p.as_ident())
                    .map(|i| i.value.to_ascii_lowercase())
                    .collect(),
            );
            ControlFlow::Continue(())
        }
    }
    let mut relations = Relations::default();
    let _ = statement.visit(&mut relations);
    relations.tables.iter().any(|parts| match parts.as_slice() {
        [.., schema, _] if schema == "pg_catalog" || schema == "information_schema" => false,
        [table] => !table.starts_with("pg_") && !relations.ctes.contains(table),
        _ => true,
    })
}

/// Rewrites `statement` so DataFusion plans what a Postgres client meant.
pub fn rewrite(statement: &mut Statement) {
    let _ = visit_expressions_mut(statement, |expr: &mut Expr| {
        match expr {
            Expr::Like {
                pattern, escape_char, ..
            }
            | Expr::ILike {
                pattern, escape_char, ..
            }
            | Expr::SimilarTo {
                pattern, escape_char, ..
            } => {
                if let Some(escape) = escape_char.take() {
                    match &escape.value {
                        Value::SingleQuotedString(e) if e == "\\" => {}
                        Value::SingleQuotedString(e) => {
                            if let Some(p) =
                                parse_expr(&format!("{LIKE_ESCAPE}({pattern}, '{}')", e.replace('\'', "''")))
                            {
                                **pattern = p;
                            }
                        }
                        _ => *escape_char = Some(escape),
                    }
                }
            }
            Expr::Function(f) => {
                let name = f
                    .name
                    .0
                    .last()
                    .and_then(|p| p.as_ident())
                    .map(|i| i.value.to_ascii_lowercase());
                let FunctionArguments::List(list) = &mut f.args else {
                    return ControlFlow::<()>::Continue(());
                };
                let mut args = list.args.iter_mut().filter_map(|a| match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
                    _ => None,
                });
                let (first, second, third) = (args.next(), args.next(), args.next());
                let mut replacement = None;
                match (name.as_deref(), first, second, third) {
                    (
                        Some(
                            "unnest" | "array_length" | "cardinality" | "array_has" | "array_contains"
                            | "array_position",
                        ),
                        Some(array),
                        ..,
                    ) => {
                        if let Some(read) = as_catalog_array(array) {
                            *array = read;
                        }
                    }
                    // the subscripts of a one-dimensional array, beside its `unnest`
                    // (the dimension may be a parameter, as psycopg 3 binds it: it stays in the query)
                    (Some("generate_subscripts"), Some(array), Some(dimension), None) => {
                        let array = as_catalog_array(array).unwrap_or_else(|| array.clone());
                        replacement = parse_expr(&format!(
                            "unnest(range(1, CASE WHEN {dimension} = 1 THEN CAST(cardinality({array}) AS BIGINT) + 1 \
                             ELSE 1 END))"
                        ));
                    }
                    // a type's or a relation's oid by name, NULL when there is none (psycopg 3
                    // looks `hstore` up on connect)
                    (Some("to_regtype"), Some(name), None, None) => {
                        replacement = parse_expr(&format!(
                            "(SELECT min(t.oid) FROM pg_catalog.pg_type t WHERE t.typname = {name})"
                        ));
                    }
                    (Some("to_regclass"), Some(name), None, None) => {
                        replacement = parse_expr(&format!(
                            "(SELECT min(c.oid) FROM pg_catalog.pg_class c WHERE c.relname = {name} \
                             OR 'public.' || c.relname = {name})"
                        ));
                    }
                    _ => {}
                }
                if let Some(e) = replacement {
                    *expr = e;
                }
            }
            // `CASE WHEN c THEN (catalog lookup) END`: DataFusion cannot run a correlated
            // lookup inside a CASE, so the condition moves into the lookup's WHERE (no row
            // when it fails: NULL, as the CASE gives)
            Expr::Case {
                operand: None,
                conditions,
                else_result,
                ..
            } if conditions.len() == 1 && else_result.as_deref().is_none_or(is_null) => {
                if let Some(when) = conditions.first()
                    && let Expr::Subquery(query) = &when.result
                    && let SetExpr::Select(select) = query.body.as_ref()
                    && reads_only_the_catalog(&select.from)
                {
                    let mut query = query.clone();
                    if let SetExpr::Select(select) = query.body.as_mut() {
                        let condition = Expr::Nested(Box::new(when.condition.clone()));
                        select.selection = Some(match select.selection.take() {
                            Some(w) => Expr::BinaryOp {
                                left: Box::new(Expr::Nested(Box::new(w))),
                                op: BinaryOperator::And,
                                right: Box::new(condition),
                            },
                            None => condition,
                        });
                    }
                    *expr = Expr::Subquery(query);
                }
            }
            // a catalog lookup in a column: Postgres fails it at run time if it finds two rows,
            // DataFusion refuses to plan it unless it is an aggregate
            Expr::Subquery(query) => {
                if let SetExpr::Select(select) = query.body.as_mut()
                    && select.group_by == GroupByExpr::Expressions(vec![], vec![])
                    && reads_only_the_catalog(&select.from)
                    && let [item] = select.projection.as_mut_slice()
                {
                    let value = match item {
                        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
                        _ => return ControlFlow::Continue(()),
                    };
                    if !is_aggregate(value)
                        && let Some(e) = parse_expr(&format!("max({value})"))
                    {
                        *value = e;
                    }
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    });
}

/// Whether every table `from` names is in the Postgres catalog.
fn reads_only_the_catalog(from: &[TableWithJoins]) -> bool {
    fn is_catalog(factor: &TableFactor) -> bool {
        match factor {
            TableFactor::Table { name, .. } => {
                let parts: Vec<String> = name
                    .0
                    .iter()
                    .filter_map(|p| p.as_ident())
                    .map(|i| i.value.to_ascii_lowercase())
                    .collect();
                match parts.as_slice() {
                    [schema, _] => schema == "pg_catalog",
                    [table] => table.starts_with("pg_"),
                    _ => false,
                }
            }
            _ => false,
        }
    }
    !from.is_empty()
        && from
            .iter()
            .all(|t| is_catalog(&t.relation) && t.joins.iter().all(|j| is_catalog(&j.relation)))
}

fn is_null(e: &Expr) -> bool {
    matches!(e, Expr::Value(v) if v.value == Value::Null)
}

fn is_aggregate(e: &Expr) -> bool {
    const AGGREGATES: &[&str] = &[
        "max",
        "min",
        "count",
        "sum",
        "avg",
        "array_agg",
        "bool_and",
        "bool_or",
        "string_agg",
    ];
    match e {
        Expr::Function(f) => f
            .name
            .0
            .last()
            .and_then(|p| p.as_ident())
            .is_some_and(|i| AGGREGATES.contains(&i.value.to_ascii_lowercase().as_str())),
        Expr::Nested(inner) => is_aggregate(inner),
        _ => false,
    }
}

fn parse_expr(sql: &str) -> Option<Expr> {
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_expr())
        .ok()
}

/// `column` read as an array when it is one of the catalog's array columns kept as text.
fn as_catalog_array(column: &Expr) -> Option<Expr> {
    let last = match column {
        Expr::Identifier(i) => i,
        Expr::CompoundIdentifier(parts) => parts.last()?,
        _ => return None,
    };
    let name = last.value.to_ascii_lowercase();
    TEXT_ARRAY_COLUMNS
        .contains(&name.as_str())
        .then(|| parse_expr(&format!("{CATALOG_ARRAY}({column})")))
        .flatten()
}

/// `version()` as PostgreSQL words it: SQLAlchemy's dialect (and Superset, pandas and most BI
/// tools through it) reads the server's version from it on connect and refuses any other shape.
fn postgres_version() -> ScalarUDF {
    let text = format!(
        "PostgreSQL {SERVER_VERSION} (Marsad {}, Apache DataFusion {}) on {}-pc-{}-gnu, 64-bit",
        env!("CARGO_PKG_VERSION"),
        datafusion::DATAFUSION_VERSION,
        std::env::consts::ARCH,
        std::env::consts::OS,
    );
    ScalarUDF::new_from_impl(Constant::new("version", 0, ScalarValue::Utf8(Some(text))))
}

/// `pg_size_pretty(bigint)`, which `psql`'s `\dt+` and BI tools' table browsers call.
fn pg_size_pretty() -> ScalarUDF {
    use arrow::array::Int64Array;
    fn pretty(bytes: i64) -> String {
        let mut value = bytes as f64;
        for unit in ["bytes", "kB", "MB", "GB", "TB"] {
            if value.abs() < 10240.0 || unit == "TB" {
                return format!("{} {unit}", value.round() as i64);
            }
            value /= 1024.0;
        }
        format!("{bytes} bytes")
    }
    let f = |args: &[ColumnarValue]| -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(args)?;
        let Some(sizes) = arrays.first().and_then(|a| a.as_any().downcast_ref::<Int64Array>()) else {
            return exec_err!("pg_size_pretty takes a bigint");
        };
        let out: StringArray = (0..sizes.len())
            .map(|i| sizes.is_valid(i).then(|| pretty(sizes.value(i))))
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    };
    create_udf(
        "pg_size_pretty",
        vec![DataType::Int64],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(f),
    )
}

/// The integers of a catalog array kept as text: `{1,2}` (an `oid[]`), `1 2` (an
/// `int2vector`); NULL stays NULL, and anything else is an error, not a guess.
fn catalog_array() -> ScalarUDF {
    fn items(text: &str) -> DfResult<Vec<Option<i64>>> {
        text.trim()
            .trim_start_matches('{')
            .trim_end_matches('}')
            .split([',', ' '])
            .filter(|s| !s.is_empty())
            .map(|s| match s {
                "NULL" => Ok(None),
                s => s
                    .parse::<i64>()
                    .map(Some)
                    .or_else(|_| exec_err!("not a catalog array of integers: {text}")),
            })
            .collect()
    }
    let f = |args: &[ColumnarValue]| -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(args)?;
        let Some(text) = arrays.first() else {
            return exec_err!("{CATALOG_ARRAY} takes one argument");
        };
        let text = arrow::compute::cast(text, &DataType::Utf8)?;
        let Some(text) = text.as_any().downcast_ref::<StringArray>() else {
            return exec_err!("{CATALOG_ARRAY} takes text");
        };
        let rows: Vec<Option<Vec<Option<i64>>>> = (0..text.len())
            .map(|i| text.is_valid(i).then(|| items(text.value(i))).transpose())
            .collect::<DfResult<_>>()?;
        let list = ListArray::from_iter_primitive::<arrow::datatypes::Int64Type, _, _>(rows);
        Ok(ColumnarValue::Array(Arc::new(list) as ArrayRef))
    };
    create_udf(
        CATALOG_ARRAY,
        vec![DataType::Utf8],
        DataType::List(Arc::new(Field::new("item", DataType::Int64, true))),
        Volatility::Immutable,
        Arc::new(f),
    )
}

/// `pattern` with its escape character `escape` turned into the backslash: `/_` (a literal
/// underscore under `ESCAPE '/'`) becomes `\_`, and a backslash the pattern meant literally is
/// doubled.
pub fn with_backslash_escape(pattern: &str, escape: char) -> String {
    let mut out = String::with_capacity(pattern.len() + 4);
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c == escape {
            match chars.next() {
                Some(next) => {
                    out.push('\\');
                    out.push(next);
                }
                // a trailing escape character escapes nothing: Postgres rejects it, and
                // so does the backslash form this gives
                None => out.push('\\'),
            }
        } else if c == '\\' {
            out.push_str("\\\\");
        } else {
            out.push(c);
        }
    }
    out
}

fn like_escape() -> ScalarUDF {
    let f = |args: &[ColumnarValue]| -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(args)?;
        let [pattern, escape] = arrays.as_slice() else {
            return exec_err!("{LIKE_ESCAPE} takes a pattern and an escape character");
        };
        let (pattern, escape) = (
            arrow::compute::cast(pattern, &DataType::Utf8)?,
            arrow::compute::cast(escape, &DataType::Utf8)?,
        );
        let (Some(pattern), Some(escape)) = (
            pattern.as_any().downcast_ref::<StringArray>(),
            escape.as_any().downcast_ref::<StringArray>(),
        ) else {
            return exec_err!("{LIKE_ESCAPE} takes text");
        };
        let mut out = Vec::with_capacity(pattern.len());
        for i in 0..pattern.len() {
            if pattern.is_null(i) || escape.is_null(i) {
                out.push(None);
                continue;
            }
            let mut e = escape.value(i).chars();
            match (e.next(), e.next()) {
                (Some(c), None) => out.push(Some(with_backslash_escape(pattern.value(i), c))),
                // `ESCAPE ''` turns escaping off: every character is itself
                (None, _) => out.push(Some(pattern.value(i).replace('\\', "\\\\"))),
                _ => return exec_err!("invalid escape string: it must be empty or one character long"),
            }
        }
        Ok(ColumnarValue::Array(Arc::new(StringArray::from(out))))
    };
    create_udf(
        LIKE_ESCAPE,
        vec![DataType::Utf8, DataType::Utf8],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(f),
    )
}

/// A catalog function whose answer is the same for every argument.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Constant {
    name: &'static str,
    signature: Signature,
    answer: ScalarValue,
}

impl Constant {
    fn new(name: &'static str, arity: usize, answer: ScalarValue) -> Self {
        let signature = if arity == 0 {
            Signature::nullary(Volatility::Stable)
        } else {
            Signature::any(arity, Volatility::Stable)
        };
        Constant {
            name,
            signature,
            answer,
        }
    }
}

impl ScalarUDFImpl for Constant {
    fn name(&self) -> &str {
        self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(self.answer.data_type())
    }
    fn invoke_with_args(&self, _: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        Ok(ColumnarValue::Scalar(self.answer.clone()))
    }
}

/// `json_build_object(key, value, …)`: SQLAlchemy's column reflection builds a column's
/// identity and collation details with it (both NULL for every Marsad column, but planned).
#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonBuildObject {
    signature: Signature,
}

impl Default for JsonBuildObject {
    fn default() -> Self {
        JsonBuildObject {
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

fn json_of(value: &ScalarValue) -> serde_json::Value {
    use serde_json::Value as J;
    if value.is_null() {
        return J::Null;
    }
    match value {
        ScalarValue::Boolean(Some(b)) => J::Bool(*b),
        ScalarValue::Int8(Some(n)) => J::from(*n),
        ScalarValue::Int16(Some(n)) => J::from(*n),
        ScalarValue::Int32(Some(n)) => J::from(*n),
        ScalarValue::Int64(Some(n)) => J::from(*n),
        ScalarValue::UInt8(Some(n)) => J::from(*n),
        ScalarValue::UInt16(Some(n)) => J::from(*n),
        ScalarValue::UInt32(Some(n)) => J::from(*n),
        ScalarValue::UInt64(Some(n)) => J::from(*n),
        ScalarValue::Float32(Some(n)) => J::from(*n),
        ScalarValue::Float64(Some(n)) => J::from(*n),
        other => J::String(other.to_string()),
    }
}

impl ScalarUDFImpl for JsonBuildObject {
    fn name(&self) -> &str {
        "json_build_object"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        if !arg_types.len().is_multiple_of(2) {
            return exec_err!("json_build_object takes keys and values in pairs");
        }
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let rows = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let mut out = Vec::with_capacity(rows);
        for row in 0..rows {
            let mut object = serde_json::Map::new();
            for pair in arrays.chunks(2) {
                let [key, value] = pair else {
                    return exec_err!("json_build_object takes keys and values in pairs");
                };
                let key = ScalarValue::try_from_array(key, row)?;
                if key.is_null() {
                    return exec_err!("null value not allowed for object key");
                }
                let key = match key {
                    ScalarValue::Utf8(Some(k)) | ScalarValue::Utf8View(Some(k)) | ScalarValue::LargeUtf8(Some(k)) => k,
                    other => other.to_string(),
                };
                object.insert(key, json_of(&ScalarValue::try_from_array(value, row)?));
            }
            out.push(serde_json::Value::Object(object).to_string());
        }
        Ok(ColumnarValue::Array(Arc::new(StringArray::from(out))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(sql: &str) -> String {
        let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap_or_default();
        let Some(mut s) = statements.pop() else {
            return String::new();
        };
        rewrite(&mut s);
        s.to_string()
    }

    #[test]
    fn another_escape_character_becomes_the_backslash() {
        assert_eq!(with_backslash_escape("pg/_%", '/'), "pg\\_%");
        assert_eq!(with_backslash_escape("a//b", '/'), "a\\/b");
        assert_eq!(with_backslash_escape("100\\%", '/'), "100\\\\%");
        assert_eq!(with_backslash_escape("x#%", '#'), "x\\%");
        let sql = rewritten("SELECT 1 FROM t WHERE a NOT LIKE 'pg/_' || '%' ESCAPE '/'");
        assert!(sql.contains("marsad_like_escape('pg/_' || '%', '/')"), "{sql}");
        assert!(!sql.contains("ESCAPE"), "{sql}");
        // the backslash, DataFusion's own escape, is left alone
        let sql = rewritten("SELECT 1 FROM t WHERE a LIKE 'x\\_' ESCAPE '\\'");
        assert!(!sql.contains("marsad_like_escape"), "{sql}");
    }

    #[test]
    fn catalog_arrays_kept_as_text_are_unnested_with_their_subscripts() {
        let sql = rewritten(
            "SELECT unnest(pg_catalog.pg_index.indkey) AS attnum, generate_subscripts(pg_catalog.pg_index.indkey, 1) AS ord FROM pg_catalog.pg_index",
        );
        assert!(
            sql.contains("unnest(marsad_catalog_array(pg_catalog.pg_index.indkey)) AS attnum"),
            "{sql}"
        );
        assert!(
            sql.contains(
                "unnest(range(1, CASE WHEN 1 = 1 THEN CAST(cardinality(marsad_catalog_array(pg_catalog.pg_index.indkey)) \
                 AS BIGINT) + 1 ELSE 1 END)) AS ord"
            ),
            "{sql}"
        );
        // a user's array column is not touched
        assert_eq!(rewritten("SELECT unnest(tags) FROM t"), "SELECT unnest(tags) FROM t");
    }

    fn parsed(sql: &str) -> String {
        let compat = PostgresCompatibilityParser::new();
        parse(&compat, sql)
            .map(|s| s.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn a_subquery_over_marsad_tables_is_planned_as_written_and_a_catalog_lookup_is_not() {
        // over `events`: the compatibility parser would answer NULL for the subquery
        let sql = "SELECT e.country, (SELECT count(*) FROM events x WHERE x.country = e.country) AS n FROM events e";
        assert_eq!(parsed(sql), sql);
        // also behind a CTE named after the table it reads, and after an ABORT
        let sql = "WITH events AS (SELECT * FROM events) SELECT e.country, (SELECT count(*) FROM events x \
                   WHERE x.country = e.country) AS n FROM events e";
        assert_eq!(parsed(sql), sql);
        assert!(parsed(&format!("ABORT; {sql}")).ends_with(sql));
        assert!(names_marsad_tables(
            &Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap_or_default()[0]
        ));
        // over the catalog (a CTE of it, too): the lookup SQLAlchemy makes answers NULL
        let sql = "WITH a AS (SELECT * FROM pg_catalog.pg_attribute) SELECT a.attname, CASE WHEN a.atthasdef \
                   THEN (SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_catalog.pg_attrdef d WHERE d.adrelid = \
                   a.attrelid) ELSE NULL END AS dflt, i.indisprimary = 'f' AS secondary, c.reloptions \
                   FROM a, pg_index i, pg_class c";
        let rewritten = parsed(sql);
        assert!(rewritten.contains("NULL AS dflt"), "{rewritten}");
        assert!(rewritten.contains("indisprimary = false AS secondary"), "{rewritten}");
        assert!(rewritten.contains("CAST(NULL AS TEXT)"), "{rewritten}");
        // a one-letter text column keeps its text
        assert!(parsed("SELECT 1 FROM pg_constraint WHERE contype = 'f'").contains("contype = 'f'"));
    }

    #[tokio::test]
    async fn the_functions_answer_as_postgres_does() -> DfResult<()> {
        let ctx = SessionContext::new();
        register_functions(&ctx);
        let one = |sql: &'static str| {
            let ctx = ctx.clone();
            async move {
                let batches = ctx.sql(sql).await?.collect().await?;
                let batch = batches.first().cloned();
                let Some(column) = batch.as_ref().map(|b| b.column(0).clone()) else {
                    return exec_err!("no rows");
                };
                ScalarValue::try_from_array(&column, 0)
            }
        };
        let version = one("SELECT version()").await?.to_string();
        // what SQLAlchemy's dialect matches: `PostgreSQL 16.6 …`
        assert!(version.starts_with("PostgreSQL 16.6 (Marsad "), "{version}");
        assert_eq!(
            one("SELECT json_build_object('name', 'x', 'n', 3, 'on', true, 'none', NULL)")
                .await?
                .to_string(),
            r#"{"n":3,"name":"x","none":null,"on":true}"#
        );
        assert_eq!(
            one("SELECT cardinality(marsad_catalog_array('{3,1,2}'))").await?,
            ScalarValue::UInt64(Some(3))
        );
        assert_eq!(
            one("SELECT array_to_string(marsad_catalog_array('1 2'), '+')")
                .await?
                .to_string(),
            "1+2"
        );
        assert!(one("SELECT marsad_catalog_array('{a}')").await.is_err());
        assert_eq!(
            one("SELECT 'pg_toast' LIKE marsad_like_escape('pg/_%', '/')").await?,
            ScalarValue::Boolean(Some(true))
        );
        assert_eq!(
            one("SELECT 'pgxtoast' LIKE marsad_like_escape('pg/_%', '/')").await?,
            ScalarValue::Boolean(Some(false))
        );
        assert_eq!(
            one("SELECT pg_get_serial_sequence('events', 'ts')").await?,
            ScalarValue::Utf8(None)
        );
        Ok(())
    }
}
