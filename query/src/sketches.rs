//! SQL functions over the rollups' visitor sketches (Apache DataSketches HLL),
//! so "unique visitors over any range and filter" reads rollups only:
//!
//! - `hll_merge(visitors)`: aggregate; the union of sketches, as a sketch;
//! - `hll_estimate(sketch)`: the estimated number of distinct visitors;
//! - `hll_sketch(visitor_key)`: aggregate; a sketch of raw values, to compare with `events`.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BinaryBuilder, BooleanArray, Float64Builder, StringArray};
use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, EmitTo, GroupsAccumulator, ScalarFunctionArgs,
    ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;
use datasketches::hll::{HllSketch, HllType, HllUnion};
use marsad_schemas::HLL_LG_K;

/// Registers the sketch functions with a session.
pub fn register(ctx: &SessionContext) {
    ctx.register_udaf(AggregateUDF::from(HllAggregate::merge()));
    ctx.register_udaf(AggregateUDF::from(HllAggregate::sketch()));
    ctx.register_udf(ScalarUDF::from(HllEstimate::new()));
}

fn binary_signature() -> Signature {
    Signature::uniform(
        1,
        vec![DataType::Binary, DataType::BinaryView, DataType::LargeBinary],
        Volatility::Immutable,
    )
}

/// Calls `f` with each row's bytes (`None` for a null) of a binary column of any width, without
/// copying the column (a cast of a view column to `Binary` copies every sketch).
fn for_each_bytes(array: &ArrayRef, mut f: impl FnMut(usize, Option<&[u8]>) -> Result<()>) -> Result<()> {
    use arrow::array::AsArray;
    match array.data_type() {
        DataType::Binary => array
            .as_binary::<i32>()
            .iter()
            .enumerate()
            .try_for_each(|(i, b)| f(i, b)),
        DataType::LargeBinary => array
            .as_binary::<i64>()
            .iter()
            .enumerate()
            .try_for_each(|(i, b)| f(i, b)),
        DataType::BinaryView => array.as_binary_view().iter().enumerate().try_for_each(|(i, b)| f(i, b)),
        other => exec_err!("expected an HLL sketch (binary), not {other}"),
    }
}

fn read_sketch(bytes: &[u8]) -> Result<HllSketch> {
    match HllSketch::deserialize(bytes) {
        Ok(s) => Ok(s),
        Err(e) => exec_err!("not an HLL sketch: {e}"),
    }
}

/// `hll_merge` (sketches in) or `hll_sketch` (values in); both give a sketch.
#[derive(Debug, PartialEq, Eq, Hash)]
struct HllAggregate {
    name: &'static str,
    of_values: bool,
    signature: Signature,
}

impl HllAggregate {
    fn merge() -> Self {
        HllAggregate {
            name: "hll_merge",
            of_values: false,
            signature: binary_signature(),
        }
    }

    fn sketch() -> Self {
        HllAggregate {
            name: "hll_sketch",
            of_values: true,
            signature: Signature::uniform(
                1,
                vec![DataType::Utf8, DataType::Utf8View, DataType::LargeUtf8],
                Volatility::Immutable,
            ),
        }
    }
}

impl AggregateUDFImpl for HllAggregate {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Binary)
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(HllAccumulator::new(self.of_values)?))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        // a report merges thousands of sketches into a few groups: one union per group, fed
        // straight from the batch (the generic adapter copies each group's rows out first)
        !self.of_values
    }

    fn create_groups_accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(HllGroupsMerge::new()?))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}_sketch", args.name),
            DataType::Binary,
            true,
        ))])
    }
}

#[derive(Debug)]
struct HllAccumulator {
    union: HllUnion,
    of_values: bool,
}

impl HllAccumulator {
    fn new(of_values: bool) -> Result<Self> {
        match HllUnion::new(HLL_LG_K) {
            Ok(union) => Ok(HllAccumulator { union, of_values }),
            Err(e) => exec_err!("HLL union: {e}"),
        }
    }

    fn merge_sketches(&mut self, array: &ArrayRef) -> Result<()> {
        for_each_bytes(array, |_, bytes| {
            if let Some(bytes) = bytes {
                self.union.update(&read_sketch(bytes)?);
            }
            Ok(())
        })
    }
}

impl Accumulator for HllAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let Some(values) = values.first() else {
            return Ok(());
        };
        if !self.of_values {
            return self.merge_sketches(values);
        }
        let text = arrow::compute::cast(values, &DataType::Utf8)?;
        let Some(text) = text.as_any().downcast_ref::<StringArray>() else {
            return exec_err!("hll_sketch expects text");
        };
        for v in text.iter().flatten() {
            self.union.update_value(v);
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Binary(Some(
            self.union.to_sketch(HllType::Hll8).serialize(),
        )))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.union.estimated_size()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        match states.first() {
            Some(s) => self.merge_sketches(s),
            None => Ok(()),
        }
    }
}

/// `hll_merge` over groups: one union per group, made when the group's first row comes.
struct HllGroupsMerge {
    unions: Vec<Option<HllUnion>>,
    /// The sketch of no visitor: what a group none of whose rows passed evaluates to (as the
    /// one-group accumulator gives).
    empty: Vec<u8>,
}

impl HllGroupsMerge {
    fn new() -> Result<Self> {
        match HllSketch::new(HLL_LG_K, HllType::Hll8) {
            Ok(empty) => Ok(HllGroupsMerge {
                unions: Vec::new(),
                empty: empty.serialize(),
            }),
            Err(e) => exec_err!("HLL sketch: {e}"),
        }
    }

    fn merge_rows(
        &mut self,
        sketches: &ArrayRef,
        group_indices: &[usize],
        filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        if self.unions.len() < total_num_groups {
            self.unions.resize_with(total_num_groups, || None);
        }
        for_each_bytes(sketches, |row, bytes| {
            let (Some(bytes), Some(&group)) = (bytes, group_indices.get(row)) else {
                return Ok(());
            };
            if filter.is_some_and(|f| !f.is_valid(row) || !f.value(row)) {
                return Ok(());
            }
            let Some(slot) = self.unions.get_mut(group) else {
                return exec_err!("hll_merge: group {group} of {total_num_groups}");
            };
            let union = match slot {
                Some(union) => union,
                None => match HllUnion::new(HLL_LG_K) {
                    Ok(union) => slot.insert(union),
                    Err(e) => return exec_err!("HLL union: {e}"),
                },
            };
            union.update(&read_sketch(bytes)?);
            Ok(())
        })
    }
}

impl GroupsAccumulator for HllGroupsMerge {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        match values.first() {
            Some(sketches) => self.merge_rows(sketches, group_indices, opt_filter, total_num_groups),
            None => Ok(()),
        }
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let unions = emit_to.take_needed(&mut self.unions);
        let mut out = BinaryBuilder::with_capacity(unions.len(), unions.len() * self.empty.len());
        for union in unions {
            match union {
                Some(union) => out.append_value(union.to_sketch(HllType::Hll8).serialize()),
                None => out.append_value(&self.empty),
            }
        }
        Ok(Arc::new(out.finish()))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Ok(vec![self.evaluate(emit_to)?])
    }

    fn merge_batch(&mut self, values: &[ArrayRef], group_indices: &[usize], total_num_groups: usize) -> Result<()> {
        match values.first() {
            Some(states) => self.merge_rows(states, group_indices, None, total_num_groups),
            None => Ok(()),
        }
    }

    fn convert_to_state(&self, values: &[ArrayRef], opt_filter: Option<&BooleanArray>) -> Result<Vec<ArrayRef>> {
        // each row its own group: its sketch is its state (a filtered-out row: none)
        let Some(sketches) = values.first() else {
            return exec_err!("hll_merge takes one sketch column");
        };
        let mut out = BinaryBuilder::with_capacity(sketches.len(), 0);
        for_each_bytes(sketches, |row, bytes| {
            let passes = opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row));
            out.append_option(bytes.filter(|_| passes));
            Ok(())
        })?;
        Ok(vec![Arc::new(out.finish())])
    }

    fn size(&self) -> usize {
        let unions: usize = self.unions.iter().flatten().map(HllUnion::estimated_size).sum();
        std::mem::size_of_val(self) + self.unions.capacity() * std::mem::size_of::<Option<HllUnion>>() + unions
    }
}

/// `hll_estimate(sketch)`: distinct visitors in a sketch.
#[derive(Debug, PartialEq, Eq, Hash)]
struct HllEstimate {
    signature: Signature,
}

impl HllEstimate {
    fn new() -> Self {
        HllEstimate {
            signature: binary_signature(),
        }
    }
}

impl ScalarUDFImpl for HllEstimate {
    fn name(&self) -> &str {
        "hll_estimate"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let Some(arg) = args.args.first() else {
            return exec_err!("hll_estimate takes one sketch");
        };
        let array = arg.to_array(args.number_rows)?;
        let mut estimates = Float64Builder::with_capacity(array.len());
        for_each_bytes(&array, |_, bytes| {
            estimates.append_option(bytes.map(read_sketch).transpose()?.map(|s| s.estimate()));
            Ok(())
        })?;
        Ok(ColumnarValue::Array(Arc::new(estimates.finish())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BinaryBuilder, Float64Array, StringArray};
    use arrow::record_batch::RecordBatch;

    fn sketch_of(range: std::ops::Range<u32>) -> Vec<u8> {
        let mut s = HllSketch::new(HLL_LG_K, HllType::Hll8).expect("valid lg_k");
        for i in range {
            s.update(format!("visitor-{i}").as_str());
        }
        s.serialize()
    }

    #[tokio::test]
    async fn merged_sketches_estimate_the_union() {
        let ctx = SessionContext::new();
        register(&ctx);
        let mut b = BinaryBuilder::new();
        b.append_value(sketch_of(0..600));
        b.append_value(sketch_of(400..1000));
        b.append_null();
        let keys = StringArray::from_iter_values((0..1000).map(|i| format!("visitor-{i}")));
        let batch = RecordBatch::try_from_iter(vec![("visitors", Arc::new(b.finish()) as ArrayRef)]).expect("batch");
        let raw = RecordBatch::try_from_iter(vec![("k", Arc::new(keys) as ArrayRef)]).expect("batch");
        ctx.register_batch("r", batch).expect("register");
        ctx.register_batch("e", raw).expect("register");
        for sql in [
            "SELECT hll_estimate(hll_merge(visitors)) AS n FROM r",
            "SELECT hll_estimate(hll_sketch(k)) AS n FROM e",
        ] {
            let out = ctx.sql(sql).await.expect("plan").collect().await.expect("run");
            let n = out[0]
                .column(0)
                .as_any()
                .downcast_ref::<Float64Array>()
                .expect("f64")
                .value(0);
            // lg_k 12: relative standard error ~1.6%; 5% is over 3 sigma
            assert!((n - 1000.0).abs() < 50.0, "{sql}: estimate {n}");
        }
    }

    /// Per group, `hll_merge` (one union per group) gives what it gives over that group's rows
    /// alone (one accumulator): with nulls, a filter, a group no row of which passes it, view
    /// columns, and with the partial aggregation skipped (each row passed on as its state).
    #[tokio::test]
    async fn grouped_merges_equal_the_merge_of_each_group_alone() {
        for skip_partial in [false, true] {
            let mut config = datafusion::prelude::SessionConfig::new().with_target_partitions(2);
            if skip_partial {
                let options = &mut config.options_mut().execution;
                options.skip_partial_aggregation_probe_rows_threshold = 1;
                options.skip_partial_aggregation_probe_ratio_threshold = 0.0;
            }
            let ctx = SessionContext::new_with_config(config);
            register(&ctx);
            let (mut groups, mut sketches, mut kept) = (Vec::new(), BinaryBuilder::new(), Vec::new());
            for row in 0..60_u32 {
                groups.push(format!("g{}", row % 4));
                // g3's rows are all filtered out below; every seventh row is null
                kept.push(row % 4 != 3);
                match row % 7 {
                    0 => sketches.append_null(),
                    _ => sketches.append_value(sketch_of(row * 50..row * 50 + 200)),
                }
            }
            let batch = RecordBatch::try_from_iter(vec![
                ("g", Arc::new(StringArray::from(groups)) as ArrayRef),
                ("visitors", Arc::new(sketches.finish()) as ArrayRef),
                ("kept", Arc::new(BooleanArray::from(kept)) as ArrayRef),
            ])
            .expect("batch");
            // batches of five rows: the partial aggregation is skipped after the first
            let batches: Vec<RecordBatch> = (0..batch.num_rows()).step_by(5).map(|at| batch.slice(at, 5)).collect();
            let table = datafusion::datasource::MemTable::try_new(batch.schema(), vec![batches]).expect("a table");
            ctx.register_table("r", Arc::new(table)).expect("register");
            let estimates = |sql: String| {
                let ctx = ctx.clone();
                async move {
                    let out = ctx.sql(&sql).await.expect("plan").collect().await.expect("run");
                    let mut rows = Vec::new();
                    for b in out {
                        let (g, n) = (b.column(0).as_any(), b.column(1).as_any());
                        let g = g.downcast_ref::<StringArray>().expect("text");
                        let n = n.downcast_ref::<Float64Array>().expect("f64");
                        rows.extend((0..b.num_rows()).map(|i| (g.value(i).to_owned(), n.value(i))));
                    }
                    rows.sort_by(|a, b| a.0.cmp(&b.0));
                    rows
                }
            };
            let grouped = estimates(
                "SELECT g, hll_estimate(hll_merge(arrow_cast(visitors, 'BinaryView')) FILTER (WHERE kept)) \
                 FROM r GROUP BY g"
                    .into(),
            )
            .await;
            assert_eq!(grouped.len(), 4, "{grouped:?}");
            for (g, n) in &grouped {
                let alone = estimates(format!(
                    "SELECT '{g}', hll_estimate(hll_merge(visitors)) FROM r WHERE g = '{g}' AND kept"
                ))
                .await;
                assert_eq!(alone, vec![(g.clone(), *n)], "skip partial: {skip_partial}");
            }
            let g3 = grouped.iter().find(|(g, _)| g == "g3").map(|(_, n)| *n);
            assert_eq!(g3, Some(0.0), "a group none of whose rows passed: the empty sketch");
            assert!(grouped.iter().all(|(g, n)| g == "g3" || *n > 1000.0), "{grouped:?}");
        }
    }

    #[tokio::test]
    async fn garbage_is_a_clear_error() {
        let ctx = SessionContext::new();
        register(&ctx);
        let err = ctx
            .sql("SELECT hll_estimate(X'00FF')")
            .await
            .expect("plan")
            .collect()
            .await
            .expect_err("not a sketch");
        assert!(err.to_string().contains("not an HLL sketch"), "{err}");
    }
}
