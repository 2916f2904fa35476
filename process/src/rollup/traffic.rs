//! `traffic_hourly`: events, sessions, bounces, session time and visitors per
//! hour and dimensions. A session counts in the hour and dimensions of its
//! first event; its duration and bounce are added there as later events arrive.

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryBuilder, Date32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow::record_batch::RecordBatch;
use datasketches::hll::HllSketch;
use marsad_schemas::traffic_hourly_schema;

use super::Rollup;
use super::clamp::VisitorDayClamp;
use super::rows::{
    Col, EventRows, FastMap, INTERNED_MAX, Interner, MICROS_PER_DAY, MICROS_PER_HOUR, SessionPrint, hour_within_days,
    new_sketch, replay_rows,
};
use crate::Result;
use crate::dedup::IdFingerprints;
use crate::sessions::SESSION_GAP_MINUTES;

/// Sessions idle this long (event time) are forgotten by the rollup; longer than the
/// processor's 30-minute gap, so a session the processor continues is never counted twice.
pub(super) const SESSION_MEMORY_MICROS: i64 = 4 * SESSION_GAP_MINUTES * 60_000_000;

/// The key of a cell: the hour, then the codes of the dimensions in the table's order and
/// of the event type last.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct TrafficKey {
    hour: i64,
    dims: [u32; DIMS + 1],
}

/// The dimension columns, in the table's order.
const DIMENSIONS: [Col; DIMS] = [
    Col::Country,
    Col::Region,
    Col::DeviceType,
    Col::Os,
    Col::Browser,
    Col::Language,
    Col::PageCategory,
    Col::ReferrerDomain,
];
const DIMS: usize = 8;

struct TrafficCell {
    events: i64,
    sessions: i64,
    bounces: i64,
    session_seconds: i64,
    visitors: HllSketch,
}

impl Default for TrafficCell {
    fn default() -> Self {
        TrafficCell {
            events: 0,
            sessions: 0,
            bounces: 0,
            session_seconds: 0,
            visitors: new_sketch(),
        }
    }
}

struct OpenSession {
    start: TrafficKey,
    events: u32,
    first: i64,
    last: i64,
}

/// `traffic_hourly`, with sessions: a session counts in the hour and dimensions of its first
/// event, its duration and bounce (a single event) are added there as later events arrive.
pub(super) struct TrafficRollup {
    cells: FastMap<TrafficKey, TrafficCell>,
    open: FastMap<SessionPrint, OpenSession>,
    /// The values behind the keys' codes (of cells and of open sessions' first events).
    values: Interner,
    watermark: i64,
    clamp: VisitorDayClamp,
}

impl TrafficRollup {
    pub(super) fn new(clamp: VisitorDayClamp) -> Self {
        TrafficRollup {
            cells: FastMap::default(),
            open: FastMap::default(),
            values: Interner::default(),
            watermark: 0,
            clamp,
        }
    }

    fn key(&mut self, rows: &EventRows, i: usize) -> TrafficKey {
        let ts = rows.ts.value(i);
        let mut dims = [0; DIMS + 1];
        for (code, col) in dims.iter_mut().zip(DIMENSIONS) {
            *code = self.values.code(rows.get(col, i));
        }
        dims[DIMS] = self.values.code(Some(rows.get(Col::EventType, i).unwrap_or("custom")));
        TrafficKey {
            hour: ts - ts.rem_euclid(MICROS_PER_HOUR),
            dims,
        }
    }

    /// Follows sessions; with `emit`, adds what the row changes to the cells.
    pub(super) fn observe(&mut self, rows: &EventRows, i: usize, emit: bool) {
        let ts = rows.ts.value(i);
        let session = rows.session(i);
        // the key is needed to count the row or to remember where a session began, not to
        // follow a session already open (a replay, a row past the clamp)
        let new_session = session.is_some_and(|s| !self.open.contains_key(&s));
        let key = (emit || new_session).then(|| self.key(rows, i));
        if let (true, Some(key)) = (emit, key) {
            let cell = self.cells.entry(key).or_default();
            cell.events += 1;
            if let Some(v) = rows.get(Col::VisitorKey, i) {
                cell.visitors.update(v);
            }
        }
        self.watermark = self.watermark.max(ts);
        let Some(session) = session else {
            return;
        };
        match (self.open.get_mut(&session), key) {
            (None, Some(key)) => {
                self.open.insert(
                    session,
                    OpenSession {
                        start: key,
                        events: 1,
                        first: ts,
                        last: ts,
                    },
                );
                if emit {
                    let cell = self.cells.entry(key).or_default();
                    cell.sessions += 1;
                    cell.bounces += 1;
                }
            }
            (None, None) => {}
            (Some(open), _) => {
                open.events += 1;
                // whole seconds of the session so far, so the increments add up to its duration
                let before = (open.last - open.first) / 1_000_000;
                open.first = open.first.min(ts);
                open.last = open.last.max(ts);
                let longer = (open.last - open.first) / 1_000_000 - before;
                if emit {
                    let second = open.events == 2;
                    let cell = self.cells.entry(open.start).or_default();
                    if second {
                        cell.bounces -= 1;
                    }
                    cell.session_seconds += longer;
                }
            }
        }
    }

    pub(super) fn forget_idle(&mut self) {
        let cutoff = self.watermark - SESSION_MEMORY_MICROS;
        self.open.retain(|_, s| s.last >= cutoff);
    }
}

impl Rollup for TrafficRollup {
    fn retain_days(&mut self, first: i32, last: i32) {
        self.cells.retain(|k, _| hour_within_days(k.hour, first, last));
    }

    fn add(&mut self, rows: &EventRows, which: &[usize]) {
        for &i in which {
            // past the clamp an event still carries its session on, but counts nowhere
            let counts = self.clamp.admit(rows.ts.value(i), rows.visitor(i));
            self.observe(rows, i, counts);
        }
        self.forget_idle();
    }

    fn preload_clamp(&mut self, day: i32, visitor: &str, events: u64, _ad_events: u64) {
        self.clamp.preload(day, visitor, events);
    }

    fn replay_sessions(&mut self, batch: &RecordBatch, skip: &IdFingerprints) -> Result<()> {
        self.replay(batch, skip)?;
        self.forget_idle();
        Ok(())
    }

    fn take(&mut self) -> Result<RecordBatch> {
        let cells = std::mem::take(&mut self.cells);
        let mut hour = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut date = Date32Builder::new();
        let mut dims: Vec<StringBuilder> = (0..DIMS).map(|_| StringBuilder::new()).collect();
        let mut event_type = StringBuilder::new();
        let mut counts: Vec<Int64Builder> = (0..4).map(|_| Int64Builder::new()).collect();
        let mut visitors = BinaryBuilder::new();
        for (k, c) in cells {
            hour.append_value(k.hour);
            date.append_value(k.hour.div_euclid(MICROS_PER_DAY) as i32);
            for (b, &v) in dims.iter_mut().zip(&k.dims[..DIMS]) {
                b.append_option(self.values.value(v));
            }
            event_type.append_value(self.values.value(k.dims[DIMS]).unwrap_or("custom"));
            for (b, v) in counts
                .iter_mut()
                .zip([c.events, c.sessions, c.bounces, c.session_seconds])
            {
                b.append_value(v);
            }
            visitors.append_value(c.visitors.serialize());
        }
        let mut columns: Vec<ArrayRef> = vec![Arc::new(hour.finish()), Arc::new(date.finish())];
        columns.extend(dims.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.push(Arc::new(event_type.finish()));
        columns.extend(counts.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.push(Arc::new(visitors.finish()));
        // the cells are empty now: only the open sessions' first events hold codes
        if self.values.len() > INTERNED_MAX {
            self.values
                .rebuild(self.open.values_mut().map(|s| &mut s.start.dims[..]));
        }
        Ok(RecordBatch::try_new(traffic_hourly_schema(), columns)?)
    }
}

impl TrafficRollup {
    /// Follows the sessions of `batch` (rows of `events` in time order) without counting
    /// them, but for the rows in `skip`: how the open sessions are rebuilt after a restart.
    pub(super) fn replay(&mut self, batch: &RecordBatch, skip: &IdFingerprints) -> Result<()> {
        replay_rows(batch, skip, |rows, i| self.observe(rows, i, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollup::rows::test_batch as batch;

    fn totals(b: &RecordBatch) -> (i64, i64, i64, i64) {
        let sum = |name: &str| {
            let a = b.column_by_name(name).expect("column");
            let a = a.as_any().downcast_ref::<arrow::array::Int64Array>().expect("int64");
            a.iter().flatten().sum::<i64>()
        };
        (sum("events"), sum("sessions"), sum("bounces"), sum("session_seconds"))
    }

    /// The values behind the codes start over when there are too many of them; a session open
    /// across it still adds its duration and bounce to the cell of its first event.
    #[test]
    fn an_open_session_keeps_its_first_cell_when_the_values_start_over() {
        let mut t = TrafficRollup::new(VisitorDayClamp::new(100));
        // values no open session uses, so the rebuild gives every code a new number
        for n in 0..10 {
            t.values.code(Some(&format!("referrer-{n}.example")));
        }
        let first = batch(&[("v1", "s1", 0, "cars", "page_view")]);
        t.add(&EventRows::new(&first).expect("rows"), &[0]);
        t.take().expect("batch");
        let before = t.values.len();
        t.values.rebuild(t.open.values_mut().map(|s| &mut s.start.dims[..]));
        assert!(t.values.len() < before, "only the open session's values are kept");
        let second = batch(&[("v1", "s1", 10, "jobs", "page_view")]);
        t.add(&EventRows::new(&second).expect("rows"), &[0]);
        let out = t.take().expect("batch");
        let text = |name: &str, row: usize| {
            let a = out.column_by_name(name).expect("column");
            arrow::util::display::array_value_to_string(a, row).expect("text")
        };
        let cars = (0..out.num_rows())
            .find(|&r| text("page_category", r) == "cars")
            .expect("the first event's cell");
        assert_eq!(text("country", cars), "JO");
        assert_eq!(text("event_type", cars), "page_view");
        assert_eq!(text("session_seconds", cars), "600");
        assert_eq!(text("bounces", cars), "-1", "no longer a single-event session");
        assert_eq!(text("events", cars), "0");
    }

    #[test]
    fn sessions_bounces_and_durations_add_up_across_batches() {
        let mut t = TrafficRollup::new(VisitorDayClamp::new(100));
        let first = batch(&[
            ("v1", "s1", 0, "cars", "page_view"),
            ("v2", "s2", 1, "jobs", "page_view"),
            ("v1", "s1", 5, "cars", "page_view"),
        ]);
        let rows = EventRows::new(&first).expect("rows");
        t.add(&rows, &[0, 1, 2]);
        let a = t.take().expect("batch");
        // a later batch continues s1 by 10 more minutes and opens s3
        let second = batch(&[
            ("v1", "s1", 15, "jobs", "page_view"),
            ("v3", "s3", 20, "cars", "ad_click"),
        ]);
        let rows = EventRows::new(&second).expect("rows");
        t.add(&rows, &[0, 1]);
        let b = t.take().expect("batch");
        let (ea, sa, ba, da) = totals(&a);
        let (eb, sb, bb, db) = totals(&b);
        assert_eq!(ea + eb, 5, "events");
        assert_eq!(sa + sb, 3, "sessions s1, s2, s3");
        assert_eq!(ba + bb, 2, "s2 and s3 are single-event sessions");
        assert_eq!((da + db), 15 * 60, "s1 lasted 15 minutes");
    }
}
