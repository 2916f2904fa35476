//! `sources_hourly`: sessions by where they came from. A session counts in the
//! hour and source of its landing event (its first: channel, referrer, UTM
//! tags, country, device); its later events, page views, duration and bounce
//! are added to that cell as they arrive, so a session's internal navigation
//! never shows up as a referral from the site itself.

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryBuilder, Date32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow::record_batch::RecordBatch;
use datasketches::hll::HllSketch;
use marsad_schemas::sources_hourly_schema;

use super::Rollup;
use super::clamp::VisitorDayClamp;
use super::rows::{
    Col, EventRows, FastMap, INTERNED_MAX, Interner, MICROS_PER_DAY, MICROS_PER_HOUR, SessionPrint, hour_within_days,
    new_sketch, replay_rows,
};
use super::traffic::SESSION_MEMORY_MICROS;
use crate::Result;
use crate::channel::{ChannelGrouping, Source};
use crate::dedup::IdFingerprints;

/// The columns after `channel`, in the table's order.
const DIMENSIONS: [Col; DIMS - 1] = [
    Col::ReferrerDomain,
    Col::UtmSource,
    Col::UtmMedium,
    Col::UtmCampaign,
    Col::Country,
    Col::DeviceType,
];
const DIMS: usize = 7;

/// Source combinations whose channel is remembered before the memo starts over.
const CHANNEL_MEMO_MAX: usize = 1 << 14;

/// The key of a cell: the landing hour, then the codes of the channel and of [`DIMENSIONS`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct SourceKey {
    hour: i64,
    dims: [u32; DIMS],
}

struct SourceCell {
    sessions: i64,
    bounces: i64,
    events: i64,
    page_views: i64,
    session_seconds: i64,
    visitors: HllSketch,
}

impl Default for SourceCell {
    fn default() -> Self {
        SourceCell {
            sessions: 0,
            bounces: 0,
            events: 0,
            page_views: 0,
            session_seconds: 0,
            visitors: new_sketch(),
        }
    }
}

struct OpenSession {
    start: SourceKey,
    events: u32,
    first: i64,
    last: i64,
}

/// `sources_hourly`: sessions, and what they did, by the source of their landing event.
pub(super) struct SourcesRollup {
    cells: FastMap<SourceKey, SourceCell>,
    open: FastMap<SessionPrint, OpenSession>,
    /// The values behind the keys' codes (of cells and of open sessions' landing events).
    values: Interner,
    grouping: Arc<ChannelGrouping>,
    /// The channel's code of (referrer, utm_source, utm_medium) codes already grouped.
    channel_of: FastMap<[u32; 3], u32>,
    watermark: i64,
    clamp: VisitorDayClamp,
}

impl SourcesRollup {
    pub(super) fn new(clamp: VisitorDayClamp, grouping: Arc<ChannelGrouping>) -> Self {
        SourcesRollup {
            cells: FastMap::default(),
            open: FastMap::default(),
            values: Interner::default(),
            grouping,
            channel_of: FastMap::default(),
            watermark: 0,
            clamp,
        }
    }

    fn key(&mut self, rows: &EventRows, i: usize) -> SourceKey {
        let ts = rows.ts.value(i);
        let mut dims = [0; DIMS];
        for (code, col) in dims[1..].iter_mut().zip(DIMENSIONS) {
            *code = self.values.code(rows.get(col, i));
        }
        let source = [dims[1], dims[2], dims[3]];
        dims[0] = match self.channel_of.get(&source) {
            Some(&c) => c,
            None => {
                let channel = self.grouping.channel(Source {
                    referrer_domain: rows.get(Col::ReferrerDomain, i),
                    utm_source: rows.get(Col::UtmSource, i),
                    utm_medium: rows.get(Col::UtmMedium, i),
                });
                let c = self.values.code(Some(channel));
                self.channel_of.insert(source, c);
                c
            }
        };
        SourceKey {
            hour: ts - ts.rem_euclid(MICROS_PER_HOUR),
            dims,
        }
    }

    /// Follows sessions; with `emit`, adds what the row changes to the cells.
    fn observe(&mut self, rows: &EventRows, i: usize, emit: bool) {
        let ts = rows.ts.value(i);
        self.watermark = self.watermark.max(ts);
        let page_view = i64::from(rows.get(Col::EventType, i) == Some("page_view"));
        let visitor = rows.get(Col::VisitorKey, i);
        let count = |cell: &mut SourceCell| {
            cell.events += 1;
            cell.page_views += page_view;
            if let Some(v) = visitor {
                cell.visitors.update(v);
            }
        };
        let Some(session) = rows.session(i) else {
            // no session to land: the event counts where it came from, as no session
            if emit {
                let key = self.key(rows, i);
                count(self.cells.entry(key).or_default());
            }
            return;
        };
        if let Some(open) = self.open.get_mut(&session) {
            open.events += 1;
            // whole seconds of the session so far, so the increments add up to its duration
            let before = (open.last - open.first) / 1_000_000;
            open.first = open.first.min(ts);
            open.last = open.last.max(ts);
            let longer = (open.last - open.first) / 1_000_000 - before;
            if emit {
                let second = open.events == 2;
                let cell = self.cells.entry(open.start).or_default();
                count(cell);
                if second {
                    cell.bounces -= 1;
                }
                cell.session_seconds += longer;
            }
            return;
        }
        let start = self.key(rows, i);
        self.open.insert(
            session,
            OpenSession {
                start,
                events: 1,
                first: ts,
                last: ts,
            },
        );
        if emit {
            let cell = self.cells.entry(start).or_default();
            count(cell);
            cell.sessions += 1;
            cell.bounces += 1;
        }
    }

    fn forget_idle(&mut self) {
        let cutoff = self.watermark - SESSION_MEMORY_MICROS;
        self.open.retain(|_, s| s.last >= cutoff);
    }
}

impl Rollup for SourcesRollup {
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
        replay_rows(batch, skip, |rows, i| self.observe(rows, i, false))?;
        self.forget_idle();
        Ok(())
    }

    fn take(&mut self) -> Result<RecordBatch> {
        let cells = std::mem::take(&mut self.cells);
        let mut hour = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut date = Date32Builder::new();
        let mut dims: Vec<StringBuilder> = (0..DIMS).map(|_| StringBuilder::new()).collect();
        let mut counts: Vec<Int64Builder> = (0..5).map(|_| Int64Builder::new()).collect();
        let mut visitors = BinaryBuilder::new();
        for (k, c) in cells {
            hour.append_value(k.hour);
            date.append_value(k.hour.div_euclid(MICROS_PER_DAY) as i32);
            for (b, &v) in dims.iter_mut().zip(&k.dims) {
                b.append_option(self.values.value(v));
            }
            for (b, v) in counts
                .iter_mut()
                .zip([c.sessions, c.bounces, c.events, c.page_views, c.session_seconds])
            {
                b.append_value(v);
            }
            visitors.append_value(c.visitors.serialize());
        }
        let mut columns: Vec<ArrayRef> = vec![Arc::new(hour.finish()), Arc::new(date.finish())];
        columns.extend(dims.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.extend(counts.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.push(Arc::new(visitors.finish()));
        // clients choose the combinations: the memo is bounded by starting over
        if self.channel_of.len() > CHANNEL_MEMO_MAX {
            self.channel_of.clear();
        }
        // the cells are empty now: only the open sessions' landing events hold codes
        if self.values.len() > INTERNED_MAX {
            self.values
                .rebuild(self.open.values_mut().map(|s| &mut s.start.dims[..]));
            self.channel_of.clear();
        }
        Ok(RecordBatch::try_new(sources_hourly_schema(), columns)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollup::rows::test_batch as batch;

    fn sum(b: &RecordBatch, name: &str) -> i64 {
        let a = b.column_by_name(name).expect("column");
        let a = a.as_any().downcast_ref::<arrow::array::Int64Array>().expect("int64");
        a.iter().flatten().sum::<i64>()
    }

    #[test]
    fn a_session_and_all_its_events_count_where_it_landed() {
        let mut t = SourcesRollup::new(VisitorDayClamp::new(100), Arc::default());
        let first = batch(&[
            ("v1", "s1", 0, "cars", "page_view"),
            ("v2", "s2", 1, "jobs", "page_view"),
            ("v1", "s1", 5, "cars", "ad_click"),
        ]);
        t.add(&EventRows::new(&first).expect("rows"), &[0, 1, 2]);
        let a = t.take().expect("batch");
        // a later batch, in the next hour, continues s1
        let second = batch(&[("v1", "s1", 70, "jobs", "page_view")]);
        t.add(&EventRows::new(&second).expect("rows"), &[0]);
        let b = t.take().expect("batch");
        assert_eq!(sum(&a, "sessions") + sum(&b, "sessions"), 2);
        assert_eq!(sum(&a, "bounces") + sum(&b, "bounces"), 1, "s2 alone is a bounce");
        assert_eq!(sum(&a, "events") + sum(&b, "events"), 4);
        assert_eq!(sum(&a, "page_views") + sum(&b, "page_views"), 3);
        assert_eq!(sum(&a, "session_seconds") + sum(&b, "session_seconds"), 70 * 60);
        // the later event went to s1's landing hour, not its own
        let hours = b.column_by_name("hour").expect("hour");
        let hours = hours
            .as_any()
            .downcast_ref::<arrow::array::TimestampMicrosecondArray>()
            .expect("ts");
        assert_eq!(hours.value(0), 0);
        let channel = b.column_by_name("channel").expect("channel");
        assert_eq!(
            arrow::util::display::array_value_to_string(channel, 0).expect("text"),
            "direct"
        );
    }
}
