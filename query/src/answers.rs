//! The answers a shared session has already computed. A report asked again while no table
//! it reads has changed is answered from them: no planning, no file read.
//!
//! The answers belong to the session itself (a [`SessionConfig`] extension): the catalog
//! builds a new session, with none, for every new version of any table it serves, and drops
//! every session when it is invalidated (after an erasure this process ran). So an answer is
//! never served from another set of table versions than it was computed from. A commit by
//! another process (an erasure run elsewhere) is seen at the table's next check, at most
//! `query.table_refresh_ms` later, as by every query. What is kept is the truth before
//! release: every report still releases it through [`crate::release`] and is charged to the
//! budget as before, and its noise, keyed by the cell, is the same as when it was computed.
//!
//! Sessions a caller changes (a Postgres connection re-registers its tables) are built
//! without answers, and [`collect`] then always runs the query. The answers are held outside
//! DataFusion's memory pool, within [`MAX_BYTES`] per session (one shared session per scope
//! at a time, and those queries still running hold).
//!
//! [`SessionConfig`]: datafusion::prelude::SessionConfig

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;

use crate::error::ApiError;

/// The most bytes of answers one session keeps, their SQL counted. An answer holds every
/// group of its report before the threshold and `limit`, each with its merged sketch (about
/// 4 KiB): a geo or devices report is a few hundred KiB, and a report of more than about
/// 8,000 groups is not kept.
pub(crate) const MAX_BYTES: usize = 32 << 20;
/// The most answers one session keeps, however small (an answer with no row is a few bytes).
const MAX_ANSWERS: usize = 1024;
/// What one kept answer costs beyond its batches and its SQL (twice: map and order).
const ENTRY_OVERHEAD: usize = 256;

/// Answers computed over one session's table versions, by the SQL that asked them.
#[derive(Default)]
pub(crate) struct SessionAnswers {
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    by_sql: HashMap<String, (Arc<[RecordBatch]>, usize)>,
    /// The order answers were kept in: the oldest goes first when the bytes run out.
    order: VecDeque<String>,
    bytes: usize,
}

impl SessionAnswers {
    fn get(&self, sql: &str) -> Option<Arc<[RecordBatch]>> {
        let kept = self.kept.lock().ok()?;
        kept.by_sql.get(sql).map(|(batches, _)| batches.clone())
    }

    fn keep(&self, sql: &str, batches: Arc<[RecordBatch]>) {
        let rows: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
        let size = rows + 2 * sql.len() + ENTRY_OVERHEAD;
        if size > MAX_BYTES {
            return;
        }
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        if let Some((_, replaced)) = kept.by_sql.remove(sql) {
            // computed again on request: the newer answer is kept (the same rows)
            kept.bytes -= replaced;
            kept.order.retain(|s| s != sql);
        }
        while kept.bytes + size > MAX_BYTES || kept.by_sql.len() >= MAX_ANSWERS {
            let Some(oldest) = kept.order.pop_front() else {
                break;
            };
            if let Some((_, freed)) = kept.by_sql.remove(&oldest) {
                kept.bytes -= freed;
            }
        }
        kept.bytes += size;
        kept.order.push_back(sql.to_owned());
        kept.by_sql.insert(sql.to_owned(), (batches, size));
    }
}

/// The rows of read-only `sql` in `ctx`: the ones the session already computed (if `reuse`),
/// else run (and kept for the next question).
pub(crate) async fn collect(ctx: &SessionContext, sql: &str, reuse: bool) -> Result<Arc<[RecordBatch]>, ApiError> {
    let answers = ctx.state_ref().read().config().get_extension::<SessionAnswers>();
    if let Some(batches) = answers.as_ref().filter(|_| reuse).and_then(|a| a.get(sql)) {
        tracing::debug!(sql, "answered from the session's earlier answer");
        return Ok(batches);
    }
    let df = crate::sql::plan(ctx, sql, crate::sql::read_only()).await.map_err(|e| {
        tracing::error!(error = %e, sql, "report query failed");
        ApiError::Internal
    })?;
    let batches: Arc<[RecordBatch]> = df
        .collect()
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "report query failed");
            ApiError::Internal
        })?
        .into();
    if let Some(answers) = answers {
        answers.keep(sql, batches.clone());
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch(rows: usize) -> Arc<[RecordBatch]> {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let column = Int64Array::from(vec![1_i64; rows]);
        vec![RecordBatch::try_new(schema, vec![Arc::new(column)]).expect("a batch")].into()
    }

    #[test]
    fn the_oldest_answers_go_when_the_bytes_run_out() {
        let answers = SessionAnswers::default();
        // a quarter of the bytes each, and a little more
        let rows = MAX_BYTES / 8 / 4 + 1024;
        for sql in ["a", "b", "c", "d"] {
            answers.keep(sql, batch(rows));
        }
        assert!(answers.get("a").is_none(), "the oldest answer went to make room");
        for sql in ["b", "c", "d"] {
            assert!(answers.get(sql).is_some(), "{sql} is kept");
        }
        let kept = answers.kept.lock().expect("the lock");
        assert!(kept.bytes <= MAX_BYTES, "{} bytes kept", kept.bytes);
        assert_eq!(kept.order.len(), kept.by_sql.len());
    }

    /// Answers with no row still count: their SQL (which carries the request's filter values)
    /// and their number.
    #[test]
    fn many_empty_answers_with_long_sql_stay_within_bounds() {
        let short = SessionAnswers::default();
        for i in 0..2 * MAX_ANSWERS {
            short.keep(&i.to_string(), Vec::new().into());
        }
        assert_eq!(short.kept.lock().expect("the lock").by_sql.len(), MAX_ANSWERS);

        let answers = SessionAnswers::default();
        let long = "x".repeat(64 * 1024);
        for i in 0..2 * MAX_ANSWERS {
            answers.keep(&format!("{long}{i}"), Vec::new().into());
        }
        let kept = answers.kept.lock().expect("the lock");
        assert!(kept.by_sql.len() <= MAX_ANSWERS, "{} answers", kept.by_sql.len());
        assert!(kept.bytes <= MAX_BYTES, "{} bytes", kept.bytes);
        let held: usize = kept.by_sql.keys().map(|k| 2 * k.len() + ENTRY_OVERHEAD).sum();
        assert_eq!(kept.bytes, held, "every answer's SQL counted");
        assert!(
            kept.by_sql.contains_key(&format!("{long}{}", 2 * MAX_ANSWERS - 1)),
            "the newest kept"
        );
    }

    #[test]
    fn an_answer_larger_than_the_cache_is_not_kept() {
        let answers = SessionAnswers::default();
        answers.keep("small", batch(10));
        answers.keep("huge", batch(MAX_BYTES / 8 + 1));
        assert!(answers.get("huge").is_none());
        assert!(answers.get("small").is_some(), "nothing was evicted for it");
    }
}
