//! Compaction of the rollups: the partial rows that each commit appended are
//! merged into one row per key (counts summed, visitor sketches merged), one
//! commit per date, so reports read one row per key.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BinaryBuilder};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use datasketches::hll::{HllSketch, HllType};
use marsad_schemas::{DATE_COLUMN, HLL_LG_K};

use super::rollup_specs;
use crate::table::DeltaSink;
use crate::{Error, Result};

/// What a compaction did to one date of one rollup table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompactedDate {
    /// The table.
    pub table: &'static str,
    /// The `date` partition.
    pub date: String,
    /// Data files before.
    pub files: usize,
    /// Partial rows before.
    pub rows_before: usize,
    /// Rows after: one per key.
    pub rows_after: usize,
}

/// Merges the partial rows of every date partition of the rollup tables that has at least
/// `min_files` files into one row per key (counts summed, sketches merged), one commit per date.
/// Safe while the processor runs: rows it appends meanwhile are kept as they are.
pub async fn compact(tables: &marsad_config::TablesLocation, min_files: usize) -> Result<Vec<CompactedDate>> {
    let mut done = Vec::new();
    for spec in rollup_specs() {
        let mut sink = DeltaSink::open_or_create(tables, &spec).await?;
        let name = spec.name.as_str();
        for (date, files) in sink.files_per_date()? {
            if files < min_files || chrono::NaiveDate::parse_from_str(&date, "%Y-%m-%d").is_err() {
                continue;
            }
            let batches = sink
                .query(
                    &format!("SELECT * FROM {name} WHERE {DATE_COLUMN} = DATE '{date}'"),
                    None,
                )
                .await?;
            let rows_before = batches.iter().map(|b| b.num_rows()).sum();
            let merged = merge_partial_rows(&spec.schema, &batches)?;
            let rows_after = merged.num_rows();
            sink.replace_where(merged, format!("{DATE_COLUMN} = '{date}'")).await?;
            done.push(CompactedDate {
                table: name,
                date,
                files,
                rows_before,
                rows_after,
            });
        }
    }
    Ok(done)
}

/// One row per key of a rollup's partial rows: `Int64` columns summed, `Binary` sketch columns
/// merged, every other column is the key.
pub fn merge_partial_rows(schema: &arrow::datatypes::SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch> {
    use arrow::array::{Int64Array, UInt32Array};
    use arrow::row::{RowConverter, SortField};
    use datasketches::hll::HllUnion;
    // in the table's column order and types, whatever order and encodings the scan gave
    let mut aligned = Vec::new();
    for b in batches {
        let mut columns = Vec::new();
        for f in schema.fields() {
            let c = b
                .column_by_name(f.name())
                .ok_or_else(|| arrow::error::ArrowError::SchemaError(format!("rollup rows without `{}`", f.name())))?;
            columns.push(arrow::compute::cast(c, f.data_type())?);
        }
        aligned.push(RecordBatch::try_new(schema.clone(), columns)?);
    }
    let all = arrow::compute::concat_batches(schema, &aligned)?;
    let (mut keys, mut sums, mut sketches) = (Vec::new(), Vec::new(), Vec::new());
    for (i, f) in schema.fields().iter().enumerate() {
        match f.data_type() {
            DataType::Int64 => sums.push(i),
            DataType::Binary => sketches.push(i),
            _ => keys.push(i),
        }
    }
    let converter = RowConverter::new(
        keys.iter()
            .map(|&i| SortField::new(schema.field(i).data_type().clone()))
            .collect(),
    )?;
    let key_columns: Vec<ArrayRef> = keys.iter().map(|&i| all.column(i).clone()).collect();
    let rows = converter.convert_columns(&key_columns)?;
    let mut group_of = HashMap::new();
    let mut first: Vec<u32> = Vec::new();
    let mut totals: Vec<Vec<i64>> = vec![Vec::new(); sums.len()];
    let mut unions: Vec<Vec<HllUnion>> = (0..sketches.len()).map(|_| Vec::new()).collect();
    let ints: Vec<&Int64Array> = sums
        .iter()
        .filter_map(|&i| all.column(i).as_any().downcast_ref::<Int64Array>())
        .collect();
    let bins: Vec<&arrow::array::BinaryArray> = sketches
        .iter()
        .filter_map(|&i| all.column(i).as_any().downcast_ref::<arrow::array::BinaryArray>())
        .collect();
    for r in 0..all.num_rows() {
        let next = first.len();
        let g = *group_of.entry(rows.row(r).owned()).or_insert(next);
        if g == next {
            first.push(r as u32);
            totals.iter_mut().for_each(|t| t.push(0));
            for u in unions.iter_mut() {
                u.push(
                    HllUnion::new(HLL_LG_K)
                        .map_err(|e| Error::Arrow(arrow::error::ArrowError::ComputeError(format!("HLL union: {e}"))))?,
                );
            }
        }
        for (t, a) in totals.iter_mut().zip(&ints) {
            if a.is_valid(r) {
                t[g] += a.value(r);
            }
        }
        for (u, a) in unions.iter_mut().zip(&bins) {
            if a.is_valid(r) {
                let sketch = HllSketch::deserialize(a.value(r))
                    .map_err(|e| Error::Arrow(arrow::error::ArrowError::ComputeError(format!("stored sketch: {e}"))))?;
                u[g].update(&sketch);
            }
        }
    }
    let take = UInt32Array::from(first);
    let mut columns: Vec<ArrayRef> = Vec::new();
    for i in 0..schema.fields().len() {
        if let Some(k) = sums.iter().position(|&s| s == i) {
            columns.push(Arc::new(Int64Array::from(std::mem::take(&mut totals[k]))));
        } else if let Some(k) = sketches.iter().position(|&s| s == i) {
            let mut b = BinaryBuilder::new();
            for u in &unions[k] {
                b.append_value(u.to_sketch(HllType::Hll8).serialize());
            }
            columns.push(Arc::new(b.finish()));
        } else {
            columns.push(arrow::compute::take(all.column(i), &take, None)?);
        }
    }
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}
