//! SQL functions over the rollups' visitor sketches (Apache DataSketches HLL),
//! so "unique visitors over any range and filter" reads rollups only:
//!
//! - `hll_merge(visitors)`: aggregate; the union of sketches, as a sketch;
//! - `hll_estimate(sketch)`: the estimated number of distinct visitors;
//! - `hll_sketch(visitor_key)`: aggregate; a sketch of raw values, to compare with `events`.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BinaryArray, Float64Array, StringArray};
use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature, Volatility,
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

fn as_binary(array: &ArrayRef) -> Result<BinaryArray> {
    let cast = arrow::compute::cast(array, &DataType::Binary)?;
    match cast.as_any().downcast_ref::<BinaryArray>() {
        Some(b) => Ok(b.clone()),
        None => exec_err!("expected an HLL sketch (binary)"),
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
        let sketches = as_binary(array)?;
        for bytes in sketches.iter().flatten() {
            self.union.update(&read_sketch(bytes)?);
        }
        Ok(())
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
        let sketches = as_binary(&array)?;
        let estimates: Float64Array = sketches
            .iter()
            .map(|b| b.map(|bytes| read_sketch(bytes).map(|s| s.estimate())).transpose())
            .collect::<Result<_>>()?;
        Ok(ColumnarValue::Array(Arc::new(estimates)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BinaryBuilder, StringArray};
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
