//! sqlparser backtracks: on some short statements (dotted chains with `$`, `[` and keywords,
//! found by fuzzing) it re-walks the rest of the input at every step, and 200 bytes take it
//! minutes of CPU. Any key that may send SQL could stall the service with them, and a parse
//! cannot be cancelled from outside. [`Bounded`] wraps a dialect and counts the parser's steps
//! (each expression it starts), failing the parse once they pass a budget proportional to the
//! statement's tokens (not its bytes: a comment buys no steps), capped for any statement: a
//! linear parse never comes near it, a runaway one stops within milliseconds.

use std::cell::Cell;

use datafusion::execution::SessionState;
use datafusion::sql::parser::{DFParserBuilder, Statement};
use datafusion::sql::sqlparser::dialect::{Dialect, GenericDialect, PostgreSqlDialect};
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::error::ApiError;

mod forward;

/// Expressions a parse may start per token of SQL (comments and spaces are not tokens, so
/// padding a statement buys nothing): real statements (psql's and SQLAlchemy's catalog
/// queries, dashboards' CASE sums) stay under a tenth of the budget this gives, a backtracking
/// parse needs millions.
const STEPS_PER_TOKEN: u64 = 16;
/// Steps every statement may take, however short.
const STEPS_BASE: u64 = 4_096;
/// Steps no statement may pass, however long (a few hundred milliseconds of parsing).
const STEPS_MAX: u64 = 4_000_000;

/// `D`, with a budget of parser steps for one statement.
#[derive(Debug)]
pub struct Bounded<D> {
    inner: D,
    steps: Cell<u64>,
    budget: u64,
}

impl<D: Dialect> Bounded<D> {
    /// `inner`, allowed the steps a statement of `tokens` tokens can need.
    pub fn new(inner: D, tokens: usize) -> Self {
        let budget = STEPS_BASE
            .saturating_add(STEPS_PER_TOKEN.saturating_mul(tokens as u64))
            .min(STEPS_MAX);
        Bounded {
            inner,
            steps: Cell::new(0),
            budget,
        }
    }

    /// Whether the parse ran out of steps (then its error says nothing useful).
    pub fn exhausted(&self) -> bool {
        self.steps.get() > self.budget
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps.get()
    }

    /// Counts one step; once over budget every step fails, with the one error sqlparser's
    /// speculative parses pass on instead of trying another branch.
    fn step(&self) -> Result<(), ParserError> {
        let taken = self.steps.get().saturating_add(1);
        self.steps.set(taken);
        if taken > self.budget {
            Err(ParserError::RecursionLimitExceeded)
        } else {
            Ok(())
        }
    }
}

/// The tokens of `sql` that cost the parser a step (not spaces or comments); `None` when
/// it does not tokenize (then the parse fails before any step).
fn tokens(dialect: &dyn Dialect, sql: &str) -> Option<Vec<Token>> {
    let tokens = Tokenizer::new(dialect, sql).tokenize().ok()?;
    Some(
        tokens
            .into_iter()
            .filter(|t| !matches!(t, Token::Whitespace(_)))
            .collect(),
    )
}

fn too_complex(sql_len: usize) -> ApiError {
    tracing::info!(sql_len, "a statement ran out of parser steps");
    ApiError::BadRequest(
        "the statement is too complex to parse (the parser would backtrack without end); \
         check its brackets and dotted names"
            .into(),
    )
}

/// Parses `sql` as DataFusion would (its dialect and recursion limit), refusing a statement
/// that makes the parser backtrack without end.
pub fn parse_statement(sql: &str, state: &SessionState) -> Result<Statement, ApiError> {
    let counted = tokens(&GenericDialect {}, sql).map_or(0, |t| t.len());
    let dialect = Bounded::new(GenericDialect {}, counted);
    let limit = state.config().options().sql_parser.recursion_limit.get();
    let parsed = DFParserBuilder::new(sql)
        .with_dialect(&dialect)
        .with_recursion_limit(limit)
        .build()
        .and_then(|mut parser| parser.parse_statements());
    if dialect.exhausted() {
        return Err(too_complex(sql.len()));
    }
    let mut statements = parsed.map_err(|e| ApiError::BadRequest(format!("SQL error: {e}")))?;
    if statements.len() > 1 {
        return Err(ApiError::BadRequest("one statement at a time".into()));
    }
    statements
        .pop_front()
        .ok_or_else(|| ApiError::BadRequest("empty SQL".into()))
}

/// Refuses `sql` if the Postgres dialect's parse of it would backtrack without end: the check
/// the Postgres protocol makes before its own parser (which cannot be bounded) reads it. It
/// reads the tokens as that parser will (`ABORT` is `ROLLBACK` there), so a statement that
/// only that parser understands cannot carry a runaway one past the check.
pub fn check_postgres(sql: &str) -> Result<(), ApiError> {
    let Some(tokens) = tokens(&PostgreSqlDialect {}, sql) else {
        return Ok(()); // both parsers stop at the tokenizer
    };
    let tokens: Vec<Token> = tokens
        .into_iter()
        .map(|t| match &t {
            Token::Word(w) if w.keyword == Keyword::ABORT => Token::make_keyword("ROLLBACK"),
            _ => t,
        })
        .collect();
    let dialect = Bounded::new(PostgreSqlDialect {}, tokens.len());
    let _ = Parser::new(&dialect).with_tokens(tokens).parse_statements();
    if dialect.exhausted() {
        return Err(too_complex(sql.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn count(dialect: &dyn Dialect, sql: &str) -> usize {
        tokens(dialect, sql).map_or(0, |t| t.len())
    }

    fn findings() -> Vec<String> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/findings");
        let mut found: Vec<String> = std::fs::read_dir(dir)
            .expect("fuzz/findings")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("analyst_sql-"))
            .map(|e| String::from_utf8_lossy(&std::fs::read(e.path()).expect("a finding")).into_owned())
            .collect();
        found.sort();
        found
    }

    /// The inputs that took sqlparser 17-105 s are refused, each within a second even in a
    /// debug build, by both parsers.
    #[test]
    fn backtracking_statements_are_refused_quickly() {
        let state = datafusion::prelude::SessionContext::new().state();
        let found = findings();
        assert!(found.len() >= 3, "the fuzz findings are committed");
        let mut attacks = Vec::new();
        for sql in found {
            // padding buys no steps; a statement only the Postgres parser reads carries none past
            attacks.push(format!("/* {} */ {sql}", "x".repeat(1 << 20)));
            attacks.push(format!("ABORT; {sql}"));
            attacks.push(sql);
        }
        for sql in attacks {
            let started = Instant::now();
            let generic = parse_statement(&sql, &state);
            let postgres = check_postgres(&sql);
            let took = started.elapsed();
            let shown = &sql[..sql.len().min(80)];
            match postgres {
                Err(ApiError::BadRequest(m)) => assert!(m.contains("too complex"), "postgres: {m}"),
                other => panic!("postgres: {shown:?} gave {other:?}"),
            }
            // DataFusion's parser stops at `ABORT` (no such statement) before the runaway part
            match generic {
                Err(ApiError::BadRequest(m)) => {
                    assert!(m.contains("too complex") || sql.starts_with("ABORT"), "generic: {m}")
                }
                other => panic!("generic: {shown:?} gave {other:?}"),
            }
            assert!(took < Duration::from_secs(5), "{shown:?} took {took:?}");
        }
    }

    /// The wrapper changes nothing but the budget: every statement in the fuzz corpus parses to
    /// the same tree (or the same error) as with the bare dialect, and far within budget.
    #[test]
    fn bounded_dialects_parse_as_the_bare_ones() {
        // deep statements of the corpus need more than a test thread's stack in a debug build
        std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn(parse_the_corpus_both_ways)
            .expect("a thread")
            .join()
            .expect("the comparison");
    }

    fn parse_the_corpus_both_ways() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/analyst_sql");
        let mut compared = 0;
        let mut runaway = 0;
        let mut statements = realistic();
        for entry in std::fs::read_dir(dir).expect("the analyst SQL corpus").flatten() {
            if let Ok(sql) = String::from_utf8(std::fs::read(entry.path()).expect("a corpus file")) {
                statements.push(sql);
            }
        }
        for sql in &statements {
            if sql.len() > 4096 {
                continue;
            }
            let bounded = Bounded::new(GenericDialect {}, count(&GenericDialect {}, sql));
            let generic = Parser::parse_sql(&bounded, sql);
            if bounded.exhausted() {
                runaway += 1; // a runaway input of the corpus: its bare parse is the slow one
                continue;
            }
            let bare_generic = Parser::parse_sql(&GenericDialect {}, sql);
            assert_eq!(format!("{bare_generic:?}"), format!("{generic:?}"), "generic: {sql:?}");
            let bounded_pg = Bounded::new(PostgreSqlDialect {}, count(&PostgreSqlDialect {}, sql));
            let pg = Parser::parse_sql(&bounded_pg, sql);
            if bounded_pg.exhausted() {
                continue;
            }
            let bare_pg = Parser::parse_sql(&PostgreSqlDialect {}, sql);
            assert_eq!(format!("{bare_pg:?}"), format!("{pg:?}"), "postgres: {sql:?}");
            compared += 1;
        }
        assert!(compared > 1000, "compared {compared}");
        println!("{compared} statements parse alike; {runaway} ran out of steps");
    }

    /// Statements people and their tools send, long and nested.
    fn realistic() -> Vec<String> {
        [
            "SELECT 1",
            "SELECT country, count(*) FROM events WHERE path LIKE '/cars/%' GROUP BY 1 ORDER BY 2 DESC LIMIT 10",
            "SELECT CASE WHEN x::int > 1 THEN 'a' ELSE 'b' END, a.b.c, arr[1], $1 FROM t AS a",
            "SELECT campaign_id, sum(CASE WHEN event_type = 'ad_impression' THEN 1 ELSE 0 END) AS impressions, \
             sum(CASE WHEN event_type = 'ad_click' THEN 1 ELSE 0 END) AS clicks, \
             round(100.0 * sum(CASE WHEN event_type = 'ad_click' THEN 1 ELSE 0 END) / nullif(sum(CASE WHEN event_type = 'ad_impression' THEN 1 ELSE 0 END), 0), 2) AS ctr \
             FROM events WHERE event_time >= now() - INTERVAL '7 days' AND campaign_id IS NOT NULL \
             GROUP BY campaign_id HAVING count(*) > 10 ORDER BY clicks DESC, impressions DESC LIMIT 20",
            "WITH s AS (SELECT session_id, count(*) AS pages, min(event_time) AS first_seen FROM events \
             WHERE event_type = 'page_view' GROUP BY session_id), b AS (SELECT CASE WHEN pages = 1 THEN 'one' \
             WHEN pages < 5 THEN 'few' ELSE 'many' END AS bucket FROM s) \
             SELECT bucket, count(*) FROM b GROUP BY bucket ORDER BY (SELECT count(*) FROM s) DESC",
            "SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_namespace n \
             ON n.oid = c.relnamespace WHERE c.relname OPERATOR(pg_catalog.~) '^(events)$' COLLATE pg_catalog.default \
             AND pg_catalog.pg_table_is_visible(c.oid) ORDER BY 2, 3",
            "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), (SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid, true) \
             FROM pg_catalog.pg_attrdef d WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum AND a.atthasdef), a.attnotnull, \
             (SELECT c.collname FROM pg_catalog.pg_collation c, pg_catalog.pg_type t WHERE c.oid = a.attcollation \
             AND t.oid = a.atttypid AND a.attcollation <> t.typcollation) AS attcollation, a.attidentity, a.attgenerated \
             FROM pg_catalog.pg_attribute a WHERE a.attrelid = '16384' AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            "SELECT pg_catalog.pg_attribute.attname AS name, pg_catalog.format_type(pg_catalog.pg_attribute.atttypid, \
             pg_catalog.pg_attribute.atttypmod) AS format_type, (SELECT pg_catalog.pg_get_expr(pg_catalog.pg_attrdef.adbin, \
             pg_catalog.pg_attrdef.adrelid) AS pg_get_expr_1 FROM pg_catalog.pg_attrdef WHERE pg_catalog.pg_attrdef.adrelid = \
             pg_catalog.pg_attribute.attrelid AND pg_catalog.pg_attrdef.adnum = pg_catalog.pg_attribute.attnum AND \
             pg_catalog.pg_attribute.atthasdef) AS \"default\", pg_catalog.pg_attribute.attnotnull AS not_null, \
             pg_catalog.pg_class.relname AS table_name, pg_catalog.pg_description.description AS comment \
             FROM pg_catalog.pg_class LEFT OUTER JOIN pg_catalog.pg_attribute ON pg_catalog.pg_class.oid = \
             pg_catalog.pg_attribute.attrelid AND pg_catalog.pg_attribute.attnum > 0 AND NOT pg_catalog.pg_attribute.attisdropped \
             LEFT OUTER JOIN pg_catalog.pg_description ON pg_catalog.pg_description.objoid = pg_catalog.pg_attribute.attrelid \
             AND pg_catalog.pg_description.objsubid = pg_catalog.pg_attribute.attnum JOIN pg_catalog.pg_namespace ON \
             pg_catalog.pg_namespace.oid = pg_catalog.pg_class.relnamespace WHERE pg_catalog.pg_class.relkind = ANY \
             (ARRAY['r', 'p', 'f', 'v', 'm']) AND pg_catalog.pg_table_is_visible(pg_catalog.pg_class.oid) AND \
             pg_catalog.pg_namespace.nspname != 'pg_catalog' AND pg_catalog.pg_class.relname IN ('events') \
             ORDER BY pg_catalog.pg_class.relname, pg_catalog.pg_attribute.attnum",
        ]
        .map(String::from)
        .to_vec()
    }

    /// Real statements use a small part of their step budget: the bound refuses runaways only.
    #[test]
    fn real_statements_are_far_within_budget() {
        std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn(|| {
                for sql in realistic() {
                    for used in [
                        {
                            let d = Bounded::new(GenericDialect {}, count(&GenericDialect {}, &sql));
                            let _ = Parser::parse_sql(&d, &sql).expect("parses");
                            d.steps() as f64 / d.budget as f64
                        },
                        {
                            let d = Bounded::new(PostgreSqlDialect {}, count(&PostgreSqlDialect {}, &sql));
                            let _ = Parser::parse_sql(&d, &sql).expect("parses");
                            d.steps() as f64 / d.budget as f64
                        },
                    ] {
                        assert!(used < 0.1, "{sql} used {:.1}% of its step budget", used * 100.0);
                    }
                }
            })
            .expect("a thread")
            .join()
            .expect("within budget");
    }

    /// The forwarding impl is generated from the sqlparser the workspace builds with.
    #[test]
    fn forwarding_matches_the_locked_sqlparser() {
        let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).expect("Cargo.lock");
        let locked = format!("name = \"sqlparser\"\nversion = \"{}\"", forward::SQLPARSER_VERSION);
        assert!(
            lock.contains(&locked),
            "sqlparser changed: run python3 scripts/forward_dialect.py"
        );
    }
}
