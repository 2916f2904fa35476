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
        Ok(Box::new(HllAccumulator::new(self.of_values)))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        // a report merges thousands of sketches into a few groups: one union per group, fed
        // straight from the batch (the generic adapter copies each group's rows out first)
        !self.of_values
    }

    fn create_groups_accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::<HllGroupsMerge>::default())
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}_sketch", args.name),
            DataType::Binary,
            true,
        ))])
    }
}

/// One group's `hll_merge` or `hll_sketch` (no GROUP BY): the same merge as each group's.
struct HllAccumulator {
    merge: GroupMerge,
    of_values: bool,
}

impl std::fmt::Debug for HllAccumulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HllAccumulator")
            .field("of_values", &self.of_values)
            .finish()
    }
}

impl HllAccumulator {
    fn new(of_values: bool) -> Self {
        HllAccumulator {
            merge: GroupMerge::default(),
            of_values,
        }
    }

    fn merge_sketches(&mut self, array: &ArrayRef) -> Result<()> {
        for_each_bytes(array, |_, bytes| match bytes {
            Some(bytes) => self.merge.add(bytes),
            None => Ok(()),
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
        text.iter().flatten().try_for_each(|v| self.merge.add_value(v))
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Binary(Some(self.merge.sketch()?)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.merge.size()
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

/// Bytes before the registers of a serialized HLL sketch in HLL mode (DataSketches' format:
/// preamble ints, serial version, family, lg_k, lg_arr, flags, cur_min, mode; the HIP
/// accumulator, kxq0, kxq1; the registers at zero, the auxiliary count).
const HLL_PREAMBLE: usize = 40;
/// The mode byte of a dense sketch of one byte per register (HLL mode, HLL_8).
const HLL8_DENSE_MODE: u8 = 2 | (2 << 2);
/// The flag a sketch sets once its history is not one stream (a union): HIP is not used.
const OUT_OF_ORDER: u8 = 16;
const EMPTY: u8 = 4;
/// The flag of a sketch serialized without its hash table's empty slots.
const COMPACT: u8 = 8;
/// The low bits of the mode byte: the sketch's current mode.
const MODE_MASK: u8 = 3;
const LIST_MODE: u8 = 0;
const SET_MODE: u8 = 1;
/// Preamble ints of a sparse sketch in LIST and in SET mode, and their bytes before the coupons
/// (DataSketches' format: as a dense sketch's first eight bytes, the coupon count in the seventh
/// for a list; after them, the count as four bytes for a set).
const LIST_PREINTS: u8 = 2;
const SET_PREINTS: u8 = 3;
const LIST_PREAMBLE: usize = 8;
const SET_PREAMBLE: usize = 12;
/// A list's table size, as DataSketches writes and reads it (eight coupons at most).
const LIST_LG_ARR: u8 = 3;
/// The smallest table of a set DataSketches reads (the largest is lg_k - 3: beyond, dense).
const SET_LG_ARR_MIN: u8 = 5;
/// DataSketches' family id of HLL.
const HLL_FAMILY: u8 = 7;
const REGISTERS: usize = 1 << HLL_LG_K;

/// The largest value a register holds: DataSketches takes the register's index from one half
/// of the 128-bit hash and its value from the other, as its leading zeros capped at 62, plus
/// one (`Coupon::from_value`).
const MAX_REGISTER: u8 = 63;

/// The registers of `bytes` if it is a dense HLL_8 sketch of Marsad's lg_k (one byte per
/// register: their union is their maximum); `None` for any other sketch, which the
/// library merges (or refuses).
fn dense_registers(bytes: &[u8]) -> Result<Option<&[u8]>> {
    let dense = bytes.len() == HLL_PREAMBLE + REGISTERS
        && bytes[..4] == [10, 1, HLL_FAMILY, HLL_LG_K]
        && bytes[5] & EMPTY == 0
        && bytes[6] == 0
        && bytes[7] == HLL8_DENSE_MODE
        && bytes[36..40] == [0; 4];
    if !dense {
        return Ok(None);
    }
    let registers = &bytes[HLL_PREAMBLE..];
    // no hash gives more (crafted bytes could; the library would then overflow a shift)
    if registers.iter().any(|&r| r > MAX_REGISTER) {
        return exec_err!("not an HLL sketch: a register above {MAX_REGISTER}");
    }
    Ok(Some(registers))
}

/// A dense HLL_8 sketch of `registers` (out of order: its estimate is the composite one),
/// with the register sums DataSketches keeps, as it computes them.
fn dense_sketch(registers: &[u8]) -> Result<HllSketch> {
    let (mut kxq0, mut kxq1, mut zeros) = (0.0_f64, 0.0_f64, 0_u32);
    for &value in registers {
        match value {
            0 => {
                kxq0 += 1.0;
                zeros += 1;
            }
            1..32 => kxq0 += 1.0 / (1_u64 << value) as f64,
            _ => kxq1 += 1.0 / (1_u64 << value.min(MAX_REGISTER)) as f64,
        }
    }
    let mut bytes = Vec::with_capacity(HLL_PREAMBLE + registers.len());
    bytes.extend_from_slice(&[10, 1, HLL_FAMILY, HLL_LG_K, 0, OUT_OF_ORDER, 0, HLL8_DENSE_MODE]);
    bytes.extend_from_slice(&0.0_f64.to_le_bytes());
    bytes.extend_from_slice(&kxq0.to_le_bytes());
    bytes.extend_from_slice(&kxq1.to_le_bytes());
    bytes.extend_from_slice(&zeros.to_le_bytes());
    bytes.extend_from_slice(&0_u32.to_le_bytes());
    bytes.extend_from_slice(registers);
    read_sketch(&bytes)
}

/// The coupons of `bytes` (four bytes each, a register's index in the low 26 bits and its
/// value in the high six) if it is a compact sparse sketch of Marsad's lg_k (LIST or SET mode,
/// as DataSketches serializes one with few visitors); `None` for any other sketch, which the
/// library merges (or refuses). Coupons only raise registers, so a sketch read twice, or one
/// coupon given twice, changes nothing.
fn sparse_coupons(bytes: &[u8]) -> Result<Option<&[u8]>> {
    if bytes.len() < LIST_PREAMBLE
        || bytes[1..4] != [1, HLL_FAMILY, HLL_LG_K]
        || bytes[5] & COMPACT == 0
        || bytes[5] & EMPTY != 0
    {
        return Ok(None);
    }
    // the target type: HLL_4, HLL_6 or HLL_8 (a coupon is the same for all three)
    if (bytes[7] >> 2) & MODE_MASK > 2 {
        return Ok(None);
    }
    let lg_arr = bytes[4];
    let (count, capacity, coupons) = match (bytes[0], bytes[7] & MODE_MASK) {
        (LIST_PREINTS, LIST_MODE) if lg_arr == LIST_LG_ARR => {
            (usize::from(bytes[6]), 1 << LIST_LG_ARR, &bytes[LIST_PREAMBLE..])
        }
        (SET_PREINTS, SET_MODE) if bytes.len() >= SET_PREAMBLE && (SET_LG_ARR_MIN..=HLL_LG_K - 3).contains(&lg_arr) => {
            let count = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            // a set's table always keeps an empty slot
            (count as usize, (1 << lg_arr) - 1, &bytes[SET_PREAMBLE..])
        }
        _ => return Ok(None),
    };
    if count == 0 || count > capacity || coupons.len() != count * 4 {
        return Ok(None);
    }
    // no hash gives a coupon of value 0 (the library's empty slot)
    if coupons.chunks_exact(4).any(|c| c[3] >> 2 == 0) {
        return exec_err!("not an HLL sketch: a coupon of no value");
    }
    Ok(Some(coupons))
}

/// Raises `registers` to the coupons' values, as DataSketches' HLL_8 array takes a coupon.
fn raise_to_coupons(registers: &mut [u8], coupons: &[u8]) {
    for c in coupons.chunks_exact(4) {
        let coupon = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        let slot = (coupon as usize) & (REGISTERS - 1);
        // six bits: never above MAX_REGISTER
        let value = (coupon >> 26) as u8;
        if let Some(r) = registers.get_mut(slot) {
            *r = (*r).max(value);
        }
    }
}

/// The sketches laid one after another in `bytes`, each ending where `ends` says.
fn one_by_one<'a>(bytes: &'a [u8], ends: &'a [u32]) -> impl Iterator<Item = &'a [u8]> {
    ends.iter().scan(0, move |start, &end| {
        let sketch = bytes.get(*start..end as usize);
        *start = end as usize;
        sketch
    })
}

/// How many bytes of sparse sketches a group keeps, waiting for a dense one to raise, before
/// they go to the library's union: about what the union itself holds (a set's table, or a
/// register a byte), so a grouping of many small groups needs no more memory than it did.
const PENDING_LIMIT: usize = REGISTERS;

/// One group's merge: the dense sketches' registers kept as their maximum (DataSketches
/// recomputes its register sums after every merge, most of a report's time), the sparse ones
/// raising those registers coupon by coupon once a dense one has come (until then they wait,
/// up to [`PENDING_LIMIT`] bytes), the others merged by the library; the three meet once, when the
/// group is evaluated. A group of sparse sketches only is the library's union alone, as it
/// stays sparse (exact at few visitors) there. In DataSketches, a union with a dense sketch in
/// it is dense, and takes a coupon as the register's maximum: the same registers.
///
/// The result is marked out of order, as any union of two or more sketches is: its estimate is
/// DataSketches' composite one. A group of one dense sketch written in order (once estimated by
/// its HIP accumulator) is estimated so too; both are within the sketch's error.
#[derive(Default)]
struct GroupMerge {
    registers: Option<Box<[u8]>>,
    /// The sparse sketches that came before any dense one, as read, one after another: a dense
    /// one may still come and take their coupons as registers, cheaper than the library's union.
    pending: Vec<u8>,
    /// Where each of them ends in `pending`.
    pending_ends: Vec<u32>,
    union: Option<HllUnion>,
}

impl GroupMerge {
    fn add(&mut self, bytes: &[u8]) -> Result<()> {
        if let Some(theirs) = dense_registers(bytes)? {
            let mine = self
                .registers
                .get_or_insert_with(|| vec![0; REGISTERS].into_boxed_slice());
            for (m, t) in mine.iter_mut().zip(theirs) {
                *m = (*m).max(*t);
            }
            for waiting in one_by_one(&self.pending, &self.pending_ends) {
                if let Some(coupons) = sparse_coupons(waiting)? {
                    raise_to_coupons(mine, coupons);
                }
            }
            self.pending.clear();
            self.pending_ends.clear();
            return Ok(());
        }
        if let Some(coupons) = sparse_coupons(bytes)? {
            match &mut self.registers {
                Some(mine) => raise_to_coupons(mine, coupons),
                None if self.pending.len() + bytes.len() > PENDING_LIMIT => {
                    self.unite_pending()?;
                    self.union()?.update(&read_sketch(bytes)?);
                }
                None => {
                    self.pending.extend_from_slice(bytes);
                    self.pending_ends.push(self.pending.len() as u32);
                }
            }
            return Ok(());
        }
        self.union()?.update(&read_sketch(bytes)?);
        Ok(())
    }

    /// The waiting sparse sketches given to the library's union.
    fn unite_pending(&mut self) -> Result<()> {
        let (pending, ends) = (
            std::mem::take(&mut self.pending),
            std::mem::take(&mut self.pending_ends),
        );
        for waiting in one_by_one(&pending, &ends) {
            self.union()?.update(&read_sketch(waiting)?);
        }
        Ok(())
    }

    fn union(&mut self) -> Result<&mut HllUnion> {
        if self.union.is_none() {
            match HllUnion::new(HLL_LG_K) {
                Ok(union) => self.union = Some(union),
                Err(e) => return exec_err!("HLL union: {e}"),
            }
        }
        match &mut self.union {
            Some(union) => Ok(union),
            None => exec_err!("HLL union"),
        }
    }

    /// Values (not sketches) in: `hll_sketch`.
    fn add_value(&mut self, value: &str) -> Result<()> {
        self.union()?.update_value(value);
        Ok(())
    }

    /// The sketch of everything added so far, serialized (of nothing: the empty sketch). More
    /// may be added after.
    fn sketch(&mut self) -> Result<Vec<u8>> {
        self.unite_pending()?;
        if let Some(registers) = self.registers.take() {
            let dense = dense_sketch(&registers)?;
            self.union()?.update(&dense);
        }
        Ok(self.union()?.to_sketch(HllType::Hll8).serialize())
    }

    fn size(&self) -> usize {
        self.registers.as_ref().map_or(0, |r| r.len())
            + self.pending.capacity()
            + self.pending_ends.capacity() * std::mem::size_of::<u32>()
            + self.union.as_ref().map_or(0, HllUnion::estimated_size)
    }
}

/// `hll_merge` over groups: one merge per group, made when the group's first row comes (a
/// group none of whose rows passed a filter gives the empty sketch, as one group alone does).
#[derive(Default)]
struct HllGroupsMerge {
    groups: Vec<GroupMerge>,
    /// What the groups hold, counted as they grow (DataFusion asks after every batch).
    held: usize,
}

impl HllGroupsMerge {
    fn merge_rows(
        &mut self,
        sketches: &ArrayRef,
        group_indices: &[usize],
        filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        if self.groups.len() < total_num_groups {
            self.groups.resize_with(total_num_groups, GroupMerge::default);
        }
        for_each_bytes(sketches, |row, bytes| {
            let (Some(bytes), Some(&group)) = (bytes, group_indices.get(row)) else {
                return Ok(());
            };
            if filter.is_some_and(|f| !f.is_valid(row) || !f.value(row)) {
                return Ok(());
            }
            let Some(merge) = self.groups.get_mut(group) else {
                return exec_err!("hll_merge: group {group} of {total_num_groups}");
            };
            let before = merge.size();
            merge.add(bytes)?;
            self.held = (self.held + merge.size()).saturating_sub(before);
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
        let groups = emit_to.take_needed(&mut self.groups);
        self.held = self.groups.iter().map(GroupMerge::size).sum();
        let mut out = BinaryBuilder::with_capacity(groups.len(), 0);
        for mut group in groups {
            out.append_value(group.sketch()?);
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
        std::mem::size_of_val(self) + self.groups.capacity() * std::mem::size_of::<GroupMerge>() + self.held
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
                // sparse sketches (coupons), dense ones (a byte per register), and nulls
                match row % 7 {
                    0 => sketches.append_null(),
                    1 | 4 => sketches.append_value(sketch_of(row * 1000..row * 1000 + 5000)),
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
                // a cell reached by two paths gives the same number
                assert_eq!(alone, vec![(g.clone(), *n)], "skip partial: {skip_partial}");
            }
            let g3 = grouped.iter().find(|(g, _)| g == "g3").map(|(_, n)| *n);
            assert_eq!(g3, Some(0.0), "a group none of whose rows passed: the empty sketch");
            assert!(grouped.iter().all(|(g, n)| g == "g3" || *n > 1000.0), "{grouped:?}");
        }
    }

    fn union_of(sketches: &[Vec<u8>]) -> HllSketch {
        let mut union = HllUnion::new(HLL_LG_K).expect("a union");
        for s in sketches {
            union.update(&HllSketch::deserialize(s).expect("a sketch"));
        }
        union.to_sketch(HllType::Hll8)
    }

    /// Dense sketches are merged as their registers' maximum: the estimate DataSketches gives
    /// for their union; sparse, other-typed or malformed sketches are left to the library.
    #[test]
    fn dense_sketches_merge_as_the_library_merges_them() {
        let dense = [sketch_of(0..6000), sketch_of(3000..20_000), sketch_of(50_000..58_000)];
        for d in &dense {
            assert!(
                matches!(dense_registers(d), Ok(Some(_))),
                "{} bytes, mode {}",
                d.len(),
                d[7]
            );
        }
        let mut merge = GroupMerge::default();
        for d in &dense {
            merge.add(d).expect("added");
        }
        merge.add(&sketch_of(100_000..100_050)).expect("a sparse one too");
        let ours = HllSketch::deserialize(&merge.sketch().expect("merged")).expect("a sketch");
        let mut all = dense.to_vec();
        all.push(sketch_of(100_000..100_050));
        let theirs = union_of(&all);
        assert!(
            (ours.estimate() - theirs.estimate()).abs() <= 1e-9 * theirs.estimate(),
            "{} against {}",
            ours.estimate(),
            theirs.estimate()
        );
        assert!(
            (ours.estimate() - 28_050.0).abs() < 28_050.0 * 0.05,
            "{}",
            ours.estimate()
        );

        // the sketch made of one's registers, read alone, estimates as the library's union
        // of it with itself (the same registers, out of order)
        let registers = dense_registers(&dense[1]).expect("valid").expect("dense");
        let alone = dense_sketch(registers).expect("a sketch");
        let library = union_of(&[dense[1].clone(), dense[1].clone()]);
        assert!(
            (alone.estimate() - library.estimate()).abs() <= 1e-9 * library.estimate(),
            "{} against {}",
            alone.estimate(),
            library.estimate()
        );

        let sparse = sketch_of(0..100);
        assert!(
            dense_registers(&sparse).expect("valid").is_none(),
            "coupons are not registers"
        );
        let mut hll4 = HllSketch::new(HLL_LG_K, HllType::Hll4).expect("a sketch");
        (0..6000).for_each(|i| hll4.update(format!("visitor-{i}").as_str()));
        assert!(
            dense_registers(&hll4.serialize()).expect("valid").is_none(),
            "four bits per register"
        );
        let mut cut = dense[0].clone();
        cut.pop();
        assert!(dense_registers(&cut).expect("valid").is_none(), "a register short");
        let mut other_k = dense[0].clone();
        other_k[3] = HLL_LG_K + 1;
        assert!(dense_registers(&other_k).expect("valid").is_none(), "another lg_k");
        // a register no hash gives: refused, not merged (nor handed to the library's shifts)
        let mut crafted = dense[0].clone();
        crafted[HLL_PREAMBLE + 7] = MAX_REGISTER + 1;
        assert!(dense_registers(&crafted).is_err());
        assert!(GroupMerge::default().add(&crafted).is_err());

        // nothing merged: the empty sketch
        let empty = HllSketch::deserialize(&GroupMerge::default().sketch().expect("nothing")).expect("a sketch");
        assert_eq!(empty.estimate(), 0.0);
    }

    /// The sizes of sketch the rollups hold: a list (under eight visitors), sets, and dense.
    const VISITORS: [u32; 6] = [1, 5, 40, 300, 2_000, 9_000];

    proptest::proptest! {
        /// Sparse sketches (lists and sets) and dense ones, in any order, merge to the registers
        /// and the estimate of the library's union of them; a group of sparse ones only is the
        /// library's union itself (it stays sparse there, exact at few visitors).
        #[test]
        fn any_mix_merges_as_the_library_merges_it(
            picks in proptest::collection::vec((0..VISITORS.len(), 0_u32..1_000), 1..24),
        ) {
            let sketches: Vec<Vec<u8>> = picks
                .iter()
                .map(|&(size, start)| sketch_of(start * 97..start * 97 + VISITORS[size]))
                .collect();
            let mut merge = GroupMerge::default();
            for s in &sketches {
                merge.add(s).expect("added");
            }
            let ours = merge.sketch().expect("merged");
            let theirs = union_of(&sketches).serialize();
            let any_dense = sketches.iter().any(|s| matches!(dense_registers(s), Ok(Some(_))));
            if !any_dense {
                proptest::prop_assert_eq!(ours, theirs);
                return Ok(());
            }
            let registers = dense_registers(&ours).expect("valid");
            proptest::prop_assert!(registers.is_some(), "a union with a dense sketch in it is dense");
            proptest::prop_assert_eq!(registers, dense_registers(&theirs).expect("valid"));
            let (a, b) = (HllSketch::deserialize(&ours).expect("a sketch"), HllSketch::deserialize(&theirs).expect("a sketch"));
            // the library's union of sketches it reads as one stream keeps that stream's (HIP)
            // estimate; ours is the composite one of the same registers, within the error
            let tolerance = if theirs[5] & OUT_OF_ORDER != 0 { 1e-9 } else { 0.05 };
            proptest::prop_assert!((a.estimate() - b.estimate()).abs() <= tolerance * b.estimate(), "{} against {}", a.estimate(), b.estimate());
        }
    }

    /// What the sparse path reads: lists and sets of Marsad's lg_k, and nothing else.
    #[test]
    fn sparse_sketches_are_read_as_coupons() {
        let list = sketch_of(0..5);
        let set = sketch_of(0..300);
        assert_eq!((list[7] & MODE_MASK, set[7] & MODE_MASK), (LIST_MODE, SET_MODE));
        assert_eq!(sparse_coupons(&list).expect("valid").map(<[u8]>::len), Some(5 * 4));
        assert_eq!(sparse_coupons(&set).expect("valid").map(<[u8]>::len), Some(300 * 4));
        assert!(
            sparse_coupons(&sketch_of(0..9_000)).expect("valid").is_none(),
            "registers are not coupons"
        );
        let empty = HllSketch::new(HLL_LG_K, HllType::Hll8).expect("a sketch").serialize();
        assert!(
            sparse_coupons(&empty).expect("valid").is_none(),
            "the empty sketch: the library's"
        );
        let mut other_k = set.clone();
        other_k[3] = HLL_LG_K + 1;
        assert!(sparse_coupons(&other_k).expect("valid").is_none(), "another lg_k");
        let mut cut = set.clone();
        cut.pop();
        assert!(sparse_coupons(&cut).expect("valid").is_none(), "a coupon short");
        let mut long = list.clone();
        long.extend_from_slice(&[0, 0, 0, 4]);
        assert!(
            sparse_coupons(&long).expect("valid").is_none(),
            "more coupons than counted"
        );
        // a coupon of value 0 no hash gives: refused, not merged
        let mut crafted = set.clone();
        crafted[SET_PREAMBLE + 3] = 0;
        assert!(sparse_coupons(&crafted).is_err());
        let mut merge = GroupMerge::default();
        merge.add(&sketch_of(0..9_000)).expect("dense");
        assert!(merge.add(&crafted).is_err());
        // shapes DataSketches does not write: left to the library (which refuses them)
        let mut nine = list.clone();
        nine[6] = 9;
        nine.extend_from_slice(&list[LIST_PREAMBLE..LIST_PREAMBLE + 16]);
        assert!(sparse_coupons(&nine).expect("valid").is_none(), "a list of nine");
        let mut none = list.clone();
        none[6] = 0;
        none.truncate(LIST_PREAMBLE);
        assert!(
            sparse_coupons(&none).expect("valid").is_none(),
            "no coupon, not marked empty"
        );
        let mut small_table = set.clone();
        small_table[4] = SET_LG_ARR_MIN - 1;
        assert!(
            sparse_coupons(&small_table).expect("valid").is_none(),
            "a set's table too small"
        );
        let mut four_bits = set.clone();
        four_bits[7] |= 3 << 2;
        assert!(
            sparse_coupons(&four_bits).expect("valid").is_none(),
            "no such target type"
        );

        // many sparse sketches and no dense one: they go to the library before they hold much,
        // and a dense one after them still gives the library's union of all
        let mut merge = GroupMerge::default();
        let mut all = Vec::new();
        for i in 0..200 {
            let sparse = sketch_of(i * 1000..i * 1000 + 40);
            merge.add(&sparse).expect("added");
            all.push(sparse);
            assert!(
                merge.pending.len() <= PENDING_LIMIT,
                "{} bytes wait",
                merge.pending.len()
            );
        }
        let dense = sketch_of(0..9_000);
        merge.add(&dense).expect("added");
        all.push(dense);
        let ours = merge.sketch().expect("merged");
        let theirs = union_of(&all).serialize();
        assert!(dense_registers(&theirs).expect("valid").is_some());
        assert_eq!(
            dense_registers(&ours).expect("valid"),
            dense_registers(&theirs).expect("valid")
        );
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
