//! Compaction of the rollups: the partial rows that each commit appended are
//! merged into one row per key (counts summed, visitor sketches merged), one
//! commit per date, so reports read one row per key.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BinaryArray, BinaryBuilder, Int64Array};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use datasketches::hll::{HllSketch, HllType, HllUnion};
use futures::StreamExt;
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
            // partial rows are merged as the scan yields them (memory is one row per key), in
            // the scan's order: the merged rows and sketches come out the same every time
            let partitions = sink
                .query_partitions(&format!("SELECT * FROM {name} WHERE {DATE_COLUMN} = DATE '{date}'"))
                .await?;
            let mut merger = PartialRowMerger::new(&spec.schema)?;
            for mut batches in partitions {
                while let Some(batch) = batches.next().await {
                    let batch = batch.map_err(|source| Error::Query { table: name, source })?;
                    merger.push(&batch)?;
                }
            }
            let rows_before = merger.rows_seen();
            let merged = merger.finish()?;
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

fn sketch_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Arrow(arrow::error::ArrowError::ComputeError(format!("{what}: {e}")))
}

/// One row per key of a rollup's partial rows, fed a batch at a time: `Int64` columns summed,
/// `Binary` sketch columns merged, every other column is the key. It holds one entry per key,
/// never the partial rows (a busy day of `pages_hourly` has hundreds of thousands of keys,
/// each in several partial rows).
pub struct PartialRowMerger {
    schema: SchemaRef,
    keys: Vec<usize>,
    sums: Vec<usize>,
    sketches: Vec<usize>,
    converter: RowConverter,
    /// The key's row encoding, and its group (groups are numbered in order of first sight).
    group_of: HashMap<Box<[u8]>, u32>,
    totals: Vec<Vec<i64>>,
    sketches_of: Vec<Vec<GroupSketch>>,
    rows_seen: usize,
}

/// The visitors of one key so far: most keys of a busy table have a single partial row, so
/// its sketch is kept as stored until a second one comes (a few dozen bytes for a key of few
/// visitors, where a union holds a hundred and more; up to 4 KiB either way at lg_k 12).
enum GroupSketch {
    None,
    One(Box<[u8]>),
    Many(Box<HllUnion>),
}

impl GroupSketch {
    fn add(&mut self, stored: &[u8]) -> Result<()> {
        let sketch = HllSketch::deserialize(stored).map_err(|e| sketch_error("stored sketch", e))?;
        match self {
            GroupSketch::None => *self = GroupSketch::One(stored.into()),
            GroupSketch::One(first) => {
                let mut union = new_union()?;
                union.update(&HllSketch::deserialize(first).map_err(|e| sketch_error("stored sketch", e))?);
                union.update(&sketch);
                *self = GroupSketch::Many(Box::new(union));
            }
            GroupSketch::Many(union) => union.update(&sketch),
        }
        Ok(())
    }

    /// The merged sketch, serialized as a union of the key's sketches gives it (one sketch
    /// alone goes through a union too, so the bytes do not depend on how many there were).
    fn serialized(self) -> Result<Vec<u8>> {
        let union = match self {
            GroupSketch::None => new_union()?,
            GroupSketch::One(first) => {
                let mut union = new_union()?;
                union.update(&HllSketch::deserialize(&first).map_err(|e| sketch_error("stored sketch", e))?);
                union
            }
            GroupSketch::Many(union) => *union,
        };
        Ok(union.to_sketch(HllType::Hll8).serialize())
    }
}

fn new_union() -> Result<HllUnion> {
    HllUnion::new(HLL_LG_K).map_err(|e| sketch_error("HLL union", e))
}

impl PartialRowMerger {
    /// A merger for rows of `schema`.
    pub fn new(schema: &SchemaRef) -> Result<Self> {
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
        Ok(PartialRowMerger {
            schema: schema.clone(),
            totals: vec![Vec::new(); sums.len()],
            sketches_of: (0..sketches.len()).map(|_| Vec::new()).collect(),
            keys,
            sums,
            sketches,
            converter,
            group_of: HashMap::new(),
            rows_seen: 0,
        })
    }

    /// Partial rows merged so far.
    pub fn rows_seen(&self) -> usize {
        self.rows_seen
    }

    /// Merges the rows of `batch` (any column order; text as `Utf8` or `Utf8View`).
    pub fn push(&mut self, batch: &RecordBatch) -> Result<()> {
        // in the table's types, whatever encodings the scan gave
        let column = |i: usize| -> Result<ArrayRef> {
            let f = self.schema.field(i);
            let c = batch
                .column_by_name(f.name())
                .ok_or_else(|| arrow::error::ArrowError::SchemaError(format!("rollup rows without `{}`", f.name())))?;
            if c.data_type() == f.data_type() {
                Ok(c.clone())
            } else {
                Ok(arrow::compute::cast(c, f.data_type())?)
            }
        };
        let key_columns: Vec<ArrayRef> = self.keys.iter().map(|&i| column(i)).collect::<Result<_>>()?;
        let sum_columns: Vec<ArrayRef> = self.sums.iter().map(|&i| column(i)).collect::<Result<_>>()?;
        let sketch_columns: Vec<ArrayRef> = self.sketches.iter().map(|&i| column(i)).collect::<Result<_>>()?;
        let cast_error = || arrow::error::ArrowError::CastError("a rollup column not in the table's type".into());
        let ints: Vec<&Int64Array> = sum_columns
            .iter()
            .map(|c| c.as_any().downcast_ref::<Int64Array>().ok_or_else(cast_error))
            .collect::<std::result::Result<_, _>>()?;
        let bins: Vec<&BinaryArray> = sketch_columns
            .iter()
            .map(|c| c.as_any().downcast_ref::<BinaryArray>().ok_or_else(cast_error))
            .collect::<std::result::Result<_, _>>()?;
        let rows = self.converter.convert_columns(&key_columns)?;
        for r in 0..batch.num_rows() {
            let key = rows.row(r);
            let g = match self.group_of.get(key.as_ref()) {
                Some(&g) => g as usize,
                None => {
                    let g = self.group_of.len();
                    self.group_of.insert(key.as_ref().into(), g as u32);
                    self.totals.iter_mut().for_each(|t| t.push(0));
                    self.sketches_of.iter_mut().for_each(|s| s.push(GroupSketch::None));
                    g
                }
            };
            for (t, a) in self.totals.iter_mut().zip(&ints) {
                if a.is_valid(r) {
                    t[g] += a.value(r);
                }
            }
            for (s, a) in self.sketches_of.iter_mut().zip(&bins) {
                if a.is_valid(r) {
                    s[g].add(a.value(r))?;
                }
            }
        }
        self.rows_seen += batch.num_rows();
        Ok(())
    }

    /// The merged rows, one per key, in the order the keys were first seen.
    pub fn finish(mut self) -> Result<RecordBatch> {
        let mut keys: Vec<(u32, Box<[u8]>)> = self.group_of.drain().map(|(k, g)| (g, k)).collect();
        keys.sort_unstable_by_key(|(g, _)| *g);
        let parser = self.converter.parser();
        let mut key_columns = self
            .converter
            .convert_rows(keys.iter().map(|(_, k)| parser.parse(k)))?
            .into_iter();
        drop(keys);
        let mut columns: Vec<ArrayRef> = Vec::new();
        for i in 0..self.schema.fields().len() {
            if let Some(k) = self.sums.iter().position(|&s| s == i) {
                columns.push(Arc::new(Int64Array::from(std::mem::take(&mut self.totals[k]))));
            } else if let Some(k) = self.sketches.iter().position(|&s| s == i) {
                let mut b = BinaryBuilder::new();
                for sketch in std::mem::take(&mut self.sketches_of[k]) {
                    b.append_value(sketch.serialized()?);
                }
                columns.push(Arc::new(b.finish()));
            } else {
                let column = key_columns
                    .next()
                    .ok_or_else(|| arrow::error::ArrowError::SchemaError("a key column short".into()))?;
                columns.push(column);
            }
        }
        Ok(RecordBatch::try_new(self.schema, columns)?)
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{StringArray, StringViewArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("country", DataType::Utf8, true),
            Field::new("events", DataType::Int64, true),
            Field::new("visitors", DataType::Binary, true),
        ]))
    }

    fn sketch_of(visitors: &[&str]) -> Vec<u8> {
        let mut s = HllSketch::new(HLL_LG_K, HllType::Hll8).unwrap_or_else(|e| panic!("{e}"));
        visitors.iter().for_each(|v| s.update(v));
        s.serialize()
    }

    /// (country, events, visitors) partial rows; `view`: the country as `Utf8View`, as a scan
    /// may give it.
    fn partial(rows: &[(Option<&str>, i64, &[&str])], view: bool) -> RecordBatch {
        let countries: ArrayRef = if view {
            Arc::new(StringViewArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>()))
        } else {
            Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>()))
        };
        let events = Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>()));
        let sketches: Vec<Vec<u8>> = rows.iter().map(|r| sketch_of(r.2)).collect();
        let visitors = Arc::new(BinaryArray::from(
            sketches.iter().map(|s| s.as_slice()).collect::<Vec<_>>(),
        ));
        // the scan may give the columns in another order
        let shuffled = Arc::new(Schema::new(vec![
            Field::new("visitors", DataType::Binary, true),
            Field::new("country", countries.data_type().clone(), true),
            Field::new("events", DataType::Int64, true),
        ]));
        RecordBatch::try_new(shuffled, vec![visitors, countries, events]).unwrap_or_else(|e| panic!("{e}"))
    }

    type TestResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

    fn merged(batches: &[RecordBatch]) -> TestResult<Vec<(Option<String>, i64, f64)>> {
        let mut merger = PartialRowMerger::new(&schema())?;
        for b in batches {
            merger.push(b)?;
        }
        let out = merger.finish()?;
        let countries = out
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or("countries as Utf8")?;
        let events = out.column(1).as_any().downcast_ref::<Int64Array>().ok_or("events")?;
        let sketches = out.column(2).as_any().downcast_ref::<BinaryArray>().ok_or("sketches")?;
        (0..out.num_rows())
            .map(|i| {
                let sketch = HllSketch::deserialize(sketches.value(i)).map_err(|e| format!("merged: {e}"))?;
                let country = countries.is_valid(i).then(|| countries.value(i).to_owned());
                Ok((country, events.value(i), sketch.estimate().round()))
            })
            .collect()
    }

    /// Partial rows of one key spread over batches (text as `Utf8` and as `Utf8View`, a null
    /// key among them) merge into one row per key, in the order keys were first seen, counts
    /// summed and visitors counted once; fed in pieces or in one batch, the result is the same.
    #[test]
    fn partial_rows_merge_into_one_row_per_key_whatever_the_batches() -> TestResult<()> {
        let rows: [(Option<&str>, i64, &[&str]); 5] = [
            (Some("SA"), 3, &["a", "b"]),
            (Some("EG"), 1, &["c"]),
            (None, 2, &["d"]),
            (Some("SA"), 4, &["b", "e"]),
            (Some("EG"), 5, &["c", "f"]),
        ];
        let expected = vec![
            (Some("SA".to_owned()), 7, 3.0),
            (Some("EG".to_owned()), 6, 2.0),
            (None, 2, 1.0),
        ];
        assert_eq!(merged(&[partial(&rows, false)])?, expected);
        let pieces = [
            partial(&rows[..2], true),
            partial(&rows[2..3], false),
            partial(&rows[3..], true),
        ];
        assert_eq!(merged(&pieces)?, expected);
        assert!(merged(&[])?.is_empty());
        Ok(())
    }
}
