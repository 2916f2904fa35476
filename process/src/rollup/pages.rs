//! `pages_hourly`: page views, entries and exits by page (the path already
//! scrubbed of personal data), hour, country and device. A session's first
//! page view is its entry; its latest page view so far is its exit, so each
//! later page view moves the exit (-1 on the page left, +1 on the new one) and
//! every session adds exactly one exit however many commits it spans.

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryBuilder, Date32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow::record_batch::RecordBatch;
use datasketches::hll::HllSketch;
use marsad_schemas::pages_hourly_schema;

use super::Rollup;
use super::clamp::VisitorDayClamp;
use super::rows::{
    Col, EventRows, FastMap, INTERNED_MAX, Interner, MICROS_PER_DAY, MICROS_PER_HOUR, SessionPrint, hour_within_days,
    new_sketch, replay_rows,
};
use super::traffic::SESSION_MEMORY_MICROS;
use crate::Result;
use crate::dedup::IdFingerprints;

/// The dimension columns, in the table's order.
const DIMENSIONS: [Col; DIMS] = [Col::PagePath, Col::PageCategory, Col::Country, Col::DeviceType];
const DIMS: usize = 4;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PageKey {
    hour: i64,
    dims: [u32; DIMS],
}

struct PageCell {
    page_views: i64,
    entries: i64,
    exits: i64,
    visitors: HllSketch,
}

impl Default for PageCell {
    fn default() -> Self {
        PageCell {
            page_views: 0,
            entries: 0,
            exits: 0,
            visitors: new_sketch(),
        }
    }
}

/// A session's page view that is its exit for now.
struct OpenVisit {
    exit: PageKey,
    /// When that page view was.
    at: i64,
    /// The session's latest event of any type (it is forgotten once idle).
    last: i64,
}

/// How a row is taken.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Take {
    /// Counted.
    Count,
    /// Followed without counting: a stored row replayed after a restart (it was counted then).
    Follow,
}

/// `pages_hourly`: what each page was to the sessions that saw it.
pub(super) struct PagesRollup {
    cells: FastMap<PageKey, PageCell>,
    open: FastMap<SessionPrint, OpenVisit>,
    /// The values behind the keys' codes (of cells and of open sessions' exits).
    values: Interner,
    watermark: i64,
    clamp: VisitorDayClamp,
}

impl PagesRollup {
    pub(super) fn new(clamp: VisitorDayClamp) -> Self {
        PagesRollup {
            cells: FastMap::default(),
            open: FastMap::default(),
            values: Interner::default(),
            watermark: 0,
            clamp,
        }
    }

    fn observe(&mut self, rows: &EventRows, i: usize, take: Take) {
        let ts = rows.ts.value(i);
        self.watermark = self.watermark.max(ts);
        if rows.get(Col::EventType, i) != Some("page_view") {
            // not a page, but the session goes on
            if let Some(open) = rows.session(i).and_then(|s| self.open.get_mut(&s)) {
                open.last = open.last.max(ts);
            }
            return;
        }
        let key = PageKey {
            hour: ts - ts.rem_euclid(MICROS_PER_HOUR),
            dims: DIMENSIONS.map(|col| self.values.code(rows.get(col, i))),
        };
        let count = take == Take::Count;
        if count {
            let cell = self.cells.entry(key).or_default();
            cell.page_views += 1;
            if let Some(v) = rows.get(Col::VisitorKey, i) {
                cell.visitors.update(v);
            }
        }
        let Some(session) = rows.session(i) else {
            return;
        };
        match self.open.get_mut(&session) {
            None => {
                self.open.insert(
                    session,
                    OpenVisit {
                        exit: key,
                        at: ts,
                        last: ts,
                    },
                );
                if count {
                    let cell = self.cells.entry(key).or_default();
                    cell.entries += 1;
                    cell.exits += 1;
                }
            }
            // a page view sent before the current exit (late) does not move it
            Some(open) if ts >= open.at => {
                let left = std::mem::replace(&mut open.exit, key);
                open.at = ts;
                open.last = open.last.max(ts);
                if count {
                    self.cells.entry(left).or_default().exits -= 1;
                    self.cells.entry(key).or_default().exits += 1;
                }
            }
            Some(open) => open.last = open.last.max(ts),
        }
    }

    fn forget_idle(&mut self) {
        let cutoff = self.watermark - SESSION_MEMORY_MICROS;
        self.open.retain(|_, s| s.last >= cutoff);
    }
}

impl Rollup for PagesRollup {
    fn retain_days(&mut self, first: i32, last: i32) {
        self.cells.retain(|k, _| hour_within_days(k.hour, first, last));
    }

    fn add(&mut self, rows: &EventRows, which: &[usize]) {
        for &i in which {
            // past the clamp a page view counts nowhere, and its session's exit stays on the
            // last page that counted (a -1 must only ever meet a +1 that was counted)
            if self.clamp.admit(rows.ts.value(i), rows.visitor(i)) {
                self.observe(rows, i, Take::Count);
            }
        }
        self.forget_idle();
    }

    fn preload_clamp(&mut self, day: i32, visitor: &str, events: u64, _ad_events: u64) {
        self.clamp.preload(day, visitor, events);
    }

    fn replay_sessions(&mut self, batch: &RecordBatch, skip: &IdFingerprints) -> Result<()> {
        replay_rows(batch, skip, |rows, i| self.observe(rows, i, Take::Follow))?;
        self.forget_idle();
        Ok(())
    }

    fn take(&mut self) -> Result<RecordBatch> {
        let cells = std::mem::take(&mut self.cells);
        let mut hour = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut date = Date32Builder::new();
        let mut dims: Vec<StringBuilder> = (0..DIMS).map(|_| StringBuilder::new()).collect();
        let mut counts: Vec<Int64Builder> = (0..3).map(|_| Int64Builder::new()).collect();
        let mut visitors = BinaryBuilder::new();
        for (k, c) in cells {
            hour.append_value(k.hour);
            date.append_value(k.hour.div_euclid(MICROS_PER_DAY) as i32);
            for (b, &v) in dims.iter_mut().zip(&k.dims) {
                b.append_option(self.values.value(v));
            }
            for (b, v) in counts.iter_mut().zip([c.page_views, c.entries, c.exits]) {
                b.append_value(v);
            }
            visitors.append_value(c.visitors.serialize());
        }
        let mut columns: Vec<ArrayRef> = vec![Arc::new(hour.finish()), Arc::new(date.finish())];
        columns.extend(dims.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.extend(counts.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.push(Arc::new(visitors.finish()));
        // the cells are empty now: only the open sessions' exits hold codes
        if self.values.len() > INTERNED_MAX {
            self.values
                .rebuild(self.open.values_mut().map(|s| &mut s.exit.dims[..]));
        }
        Ok(RecordBatch::try_new(pages_hourly_schema(), columns)?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::rollup::rows::test_batch as batch;

    /// (page_views, entries, exits) per page path, summed over batches.
    fn per_page(batches: &[RecordBatch]) -> BTreeMap<String, (i64, i64, i64)> {
        let mut out = BTreeMap::new();
        for b in batches {
            let text = |name: &str, r: usize| {
                arrow::util::display::array_value_to_string(b.column_by_name(name).expect("column"), r).expect("text")
            };
            for r in 0..b.num_rows() {
                let e: &mut (i64, i64, i64) = out.entry(text("page_path", r)).or_default();
                let n = |name: &str| text(name, r).parse::<i64>().expect("a count");
                e.0 += n("page_views");
                e.1 += n("entries");
                e.2 += n("exits");
            }
        }
        out
    }

    #[test]
    fn entries_and_exits_follow_sessions_across_commits() {
        let mut t = PagesRollup::new(VisitorDayClamp::new(100));
        // s1: cars -> jobs -> (next commit) homes; s2: jobs alone; an ad impression is no page
        let first = batch(&[
            ("v1", "s1", 0, "cars", "page_view"),
            ("v2", "s2", 1, "jobs", "page_view"),
            ("v1", "s1", 2, "jobs", "page_view"),
            ("v1", "s1", 3, "homes", "ad_impression"),
        ]);
        t.add(&EventRows::new(&first).expect("rows"), &[0, 1, 2, 3]);
        let a = t.take().expect("batch");
        let second = batch(&[("v1", "s1", 90, "homes", "page_view")]);
        t.add(&EventRows::new(&second).expect("rows"), &[0]);
        let b = t.take().expect("batch");
        let pages = per_page(&[a, b]);
        assert_eq!(pages["/cars"], (1, 1, 0));
        assert_eq!(pages["/jobs"], (2, 1, 1), "s2 left from jobs; s1 moved on");
        assert_eq!(pages["/homes"], (1, 0, 1));
        let exits: i64 = pages.values().map(|p| p.2).sum();
        assert_eq!(exits, 2, "one exit per session");
    }

    #[test]
    fn a_late_page_view_and_one_past_the_clamp_move_no_exit() {
        let mut t = PagesRollup::new(VisitorDayClamp::new(2));
        let rows = batch(&[
            ("v1", "s1", 10, "cars", "page_view"),
            ("v1", "s1", 5, "jobs", "page_view"),
            ("v1", "s1", 20, "homes", "page_view"),
        ]);
        t.add(&EventRows::new(&rows).expect("rows"), &[0, 1, 2]);
        let pages = per_page(&[t.take().expect("batch")]);
        assert_eq!(pages["/cars"], (1, 1, 1), "still the exit");
        assert_eq!(pages["/jobs"], (1, 0, 0), "sent late");
        assert!(!pages.contains_key("/homes"), "past the clamp of 2");
    }

    #[test]
    fn a_replayed_session_moves_its_exit_at_the_next_page() {
        let stored = batch(&[("v1", "s1", 0, "cars", "page_view")]);
        let mut t = PagesRollup::new(VisitorDayClamp::new(100));
        t.replay_sessions(&stored, &IdFingerprints::default()).expect("replay");
        let next = batch(&[("v1", "s1", 3, "jobs", "page_view")]);
        t.add(&EventRows::new(&next).expect("rows"), &[0]);
        let pages = per_page(&[t.take().expect("batch")]);
        assert_eq!(pages["/cars"], (0, 0, -1), "the stored exit moves on");
        assert_eq!(pages["/jobs"], (1, 0, 1));
    }
}
