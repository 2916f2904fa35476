//! `demographics_daily`: declared age band and gender (null when undeclared)
//! by day, place and page category.

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryBuilder, Date32Builder, Int64Builder, StringBuilder};
use arrow::record_batch::RecordBatch;
use datasketches::hll::HllSketch;
use marsad_schemas::demographics_daily_schema;

use super::Rollup;
use super::clamp::VisitorDayClamp;
use super::rows::{Col, EventRows, FastMap, INTERNED_MAX, Interner, MICROS_PER_DAY, new_sketch};
use crate::Result;

/// The key of a cell: the day and the codes of the dimensions, in the table's order.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct DemographicsKey {
    day: i32,
    dims: [u32; 5],
}

/// The dimension columns, in the table's order.
const DIMENSIONS: [Col; 5] = [Col::Country, Col::Region, Col::AgeBand, Col::Gender, Col::PageCategory];

struct DemographicsCell {
    events: i64,
    visitors: HllSketch,
}

/// `demographics_daily`: declared age band and gender (null when undeclared) by place and category.
pub(super) struct DemographicsRollup {
    cells: FastMap<DemographicsKey, DemographicsCell>,
    /// The values behind the keys' codes.
    values: Interner,
    clamp: VisitorDayClamp,
}

impl DemographicsRollup {
    pub(super) fn new(clamp: VisitorDayClamp) -> Self {
        DemographicsRollup {
            cells: FastMap::default(),
            values: Interner::default(),
            clamp,
        }
    }
}

impl Rollup for DemographicsRollup {
    fn retain_days(&mut self, first: i32, last: i32) {
        self.cells.retain(|k, _| (first..=last).contains(&(k.day)));
    }

    fn add(&mut self, rows: &EventRows, which: &[usize]) {
        for &i in which {
            if !self.clamp.admit(rows.ts.value(i), rows.visitor(i)) {
                continue;
            }
            let key = DemographicsKey {
                day: rows.ts.value(i).div_euclid(MICROS_PER_DAY) as i32,
                dims: DIMENSIONS.map(|col| self.values.code(rows.get(col, i))),
            };
            let cell = self.cells.entry(key).or_insert_with(|| DemographicsCell {
                events: 0,
                visitors: new_sketch(),
            });
            cell.events += 1;
            if let Some(v) = rows.get(Col::VisitorKey, i) {
                cell.visitors.update(v);
            }
        }
    }

    fn preload_clamp(&mut self, day: i32, visitor: &str, events: u64, _ad_events: u64) {
        self.clamp.preload(day, visitor, events);
    }

    fn take(&mut self) -> Result<RecordBatch> {
        let cells = std::mem::take(&mut self.cells);
        let mut date = Date32Builder::new();
        let mut dims: Vec<StringBuilder> = (0..5).map(|_| StringBuilder::new()).collect();
        let mut events = Int64Builder::new();
        let mut visitors = BinaryBuilder::new();
        for (k, c) in cells {
            date.append_value(k.day);
            for (b, &v) in dims.iter_mut().zip(&k.dims) {
                b.append_option(self.values.value(v));
            }
            events.append_value(c.events);
            visitors.append_value(c.visitors.serialize());
        }
        let mut columns: Vec<ArrayRef> = vec![Arc::new(date.finish())];
        columns.extend(dims.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.push(Arc::new(events.finish()));
        columns.push(Arc::new(visitors.finish()));
        // no cell is left to hold a code
        if self.values.len() > INTERNED_MAX {
            self.values = Interner::default();
        }
        Ok(RecordBatch::try_new(demographics_daily_schema(), columns)?)
    }
}
