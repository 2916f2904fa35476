//! The analyst SQL checker: any statement over the rollups is planned and checked without a
//! panic, and whatever it accepts is one aggregation of one rollup.
#![no_main]

use std::sync::{Arc, LazyLock};

use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use marsad_schemas::TableName;

static CONTEXT: LazyLock<SessionContext> = LazyLock::new(|| {
    let ctx = SessionContext::new();
    for (table, schema) in TableName::ROLLUPS.map(|t| (t, t.schema())) {
        let mem = MemTable::try_new(schema, vec![vec![]]).expect("an empty table");
        ctx.register_table(table.as_str(), Arc::new(mem)).expect("registered");
    }
    ctx
});

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else { return };
    if sql.len() > 4096 {
        return;
    }
    let state = CONTEXT.state();
    // the service's own parse: a runaway statement is refused within its step budget
    let Ok(statement) = marsad_query::bounded_dialect::parse_statement(sql, &state) else { return };
    let Ok(plan) = futures::executor::block_on(state.statement_to_plan(statement)) else { return };
    let rollups = TableName::ROLLUPS.map(TableName::as_str);
    let _ = marsad_query::release::analyst_sql::check(&plan, &rollups);
});
