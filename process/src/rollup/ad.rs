//! `ad_performance_hourly`: impressions, clicks and visitors of the ads per
//! hour, campaign, ad, placement, country and device.

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryBuilder, Date32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow::record_batch::RecordBatch;
use datasketches::hll::HllSketch;
use marsad_schemas::ad_performance_hourly_schema;

use super::Rollup;
use super::clamp::VisitorDayClamp;
use super::rows::{
    Col, EventRows, FastMap, INTERNED_MAX, Interner, MICROS_PER_DAY, MICROS_PER_HOUR, hour_within_days, new_sketch,
};
use crate::Result;

/// The key of a cell: the hour and the codes of the dimensions, in the table's order.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct AdKey {
    hour: i64,
    dims: [u32; 5],
}

/// The dimension columns, in the table's order.
const DIMENSIONS: [Col; 5] = [
    Col::CampaignId,
    Col::AdId,
    Col::Placement,
    Col::Country,
    Col::DeviceType,
];

struct AdCell {
    impressions: i64,
    clicks: i64,
    visitors: HllSketch,
}

/// `ad_performance_hourly`: impressions and clicks of the ads.
pub(super) struct AdRollup {
    cells: FastMap<AdKey, AdCell>,
    /// The values behind the keys' codes.
    values: Interner,
    clamp: VisitorDayClamp,
}

impl AdRollup {
    pub(super) fn new(clamp: VisitorDayClamp) -> Self {
        AdRollup {
            cells: FastMap::default(),
            values: Interner::default(),
            clamp,
        }
    }
}

impl Rollup for AdRollup {
    fn retain_days(&mut self, first: i32, last: i32) {
        self.cells.retain(|k, _| hour_within_days(k.hour, first, last));
    }

    fn add(&mut self, rows: &EventRows, which: &[usize]) {
        for &i in which {
            let (impression, click) = match rows.get(Col::EventType, i) {
                Some("ad_impression") => (1, 0),
                Some("ad_click") => (0, 1),
                _ => continue,
            };
            let ts = rows.ts.value(i);
            if !self.clamp.admit(ts, rows.visitor(i)) {
                continue;
            }
            let key = AdKey {
                hour: ts - ts.rem_euclid(MICROS_PER_HOUR),
                dims: DIMENSIONS.map(|col| self.values.code(rows.get(col, i))),
            };
            let cell = self.cells.entry(key).or_insert_with(|| AdCell {
                impressions: 0,
                clicks: 0,
                visitors: new_sketch(),
            });
            cell.impressions += impression;
            cell.clicks += click;
            if let Some(v) = rows.get(Col::VisitorKey, i) {
                cell.visitors.update(v);
            }
        }
    }

    fn preload_clamp(&mut self, day: i32, visitor: &str, _events: u64, ad_events: u64) {
        self.clamp.preload(day, visitor, ad_events);
    }

    fn take(&mut self) -> Result<RecordBatch> {
        let cells = std::mem::take(&mut self.cells);
        let mut hour = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut date = Date32Builder::new();
        let mut dims: Vec<StringBuilder> = (0..5).map(|_| StringBuilder::new()).collect();
        let mut impressions = Int64Builder::new();
        let mut clicks = Int64Builder::new();
        let mut visitors = BinaryBuilder::new();
        for (k, c) in cells {
            hour.append_value(k.hour);
            date.append_value(k.hour.div_euclid(MICROS_PER_DAY) as i32);
            for (b, &v) in dims.iter_mut().zip(&k.dims) {
                b.append_option(self.values.value(v));
            }
            impressions.append_value(c.impressions);
            clicks.append_value(c.clicks);
            visitors.append_value(c.visitors.serialize());
        }
        let mut columns: Vec<ArrayRef> = vec![Arc::new(hour.finish()), Arc::new(date.finish())];
        columns.extend(dims.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.push(Arc::new(impressions.finish()));
        columns.push(Arc::new(clicks.finish()));
        columns.push(Arc::new(visitors.finish()));
        // no cell is left to hold a code
        if self.values.len() > INTERNED_MAX {
            self.values = Interner::default();
        }
        Ok(RecordBatch::try_new(ad_performance_hourly_schema(), columns)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollup::rows::test_batch as batch;

    #[test]
    fn ad_rollup_counts_impressions_and_clicks_only() {
        let mut ad = AdRollup::new(VisitorDayClamp::new(100));
        let b = batch(&[
            ("v1", "s1", 0, "cars", "ad_impression"),
            ("v1", "s1", 1, "cars", "ad_click"),
            ("v2", "s2", 1, "cars", "page_view"),
        ]);
        ad.add(&EventRows::new(&b).expect("rows"), &[0, 1, 2]);
        let out = ad.take().expect("batch");
        let sum = |name: &str| {
            let a = out.column_by_name(name).expect("column");
            let a = a.as_any().downcast_ref::<arrow::array::Int64Array>().expect("int64");
            a.iter().flatten().sum::<i64>()
        };
        assert_eq!((sum("impressions"), sum("clicks")), (1, 1));
    }
}
