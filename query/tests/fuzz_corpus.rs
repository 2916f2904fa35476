//! The analyst SQL checker fuzzer's corpus replayed in the normal suite: every statement is
//! planned and checked without a panic, and what the checker accepts reads one rollup.

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use marsad_schemas::TableName;

/// Planning recurses with the statement's depth, and unoptimized (test) frames are several
/// times a release build's: the replay gets the stack the fuzzer's 8 MiB was in release.
#[test]
fn the_analyst_sql_corpus_is_checked_without_a_panic() {
    let replay = std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap_or_else(|e| panic!("{e}"))
                .block_on(replay_corpus())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    if let Err(panic) = replay.join() {
        std::panic::resume_unwind(panic);
    }
}

async fn replay_corpus() {
    let ctx = SessionContext::new();
    for (table, schema) in TableName::ROLLUPS.map(|t| (t, t.schema())) {
        let mem = MemTable::try_new(schema, vec![vec![]]).unwrap_or_else(|e| panic!("{e}"));
        ctx.register_table(table.as_str(), Arc::new(mem))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let rollups = TableName::ROLLUPS.map(TableName::as_str);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/analyst_sql");
    let (mut replayed, mut accepted) = (0, 0);
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.map(|e| e.path()).unwrap_or_default();
        let Ok(sql) = std::fs::read_to_string(&path) else {
            continue;
        };
        replayed += 1;
        let state = ctx.state();
        let Ok(statement) = marsad_query::bounded_dialect::parse_statement(&sql, &state) else {
            continue;
        };
        let Ok(plan) = state.statement_to_plan(statement).await else {
            continue;
        };
        if let Ok(Some(_)) = marsad_query::release::analyst_sql::check(&plan, &rollups) {
            accepted += 1;
        }
    }
    assert!(replayed > 0, "{} holds no inputs", dir.display());
    println!("{replayed} statements replayed, {accepted} accepted as one aggregation of one rollup");
}
