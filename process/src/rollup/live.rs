//! The live window: visitors and page views of the last half hour, kept in the
//! processor's memory in cells of processing time ([`LIVE_SLOT_SECONDS`] long,
//! summed into minutes once a minute has ended), for the query service to release.
//!
//! A cell is counted by when the processor counted its events, not by when they
//! happened, so once it has ended nothing is ever added to it: the number
//! released for it cannot move when a late event arrives, and two answers
//! cannot be subtracted to reveal one. Events that happened more than
//! [`LIVE_WINDOW_MINUTES`] before they are processed are not counted at all.
//!
//! What one visitor-day adds is clamped like every rollup: at most C events
//! count (`process.max_events_per_visitor_day`), and at most
//! [`LIVE_VISITS_PER_VISITOR_DAY`] arrivals. A visitor is counted when it arrives
//! and again when it is seen 30 minutes or more after it was last counted, so
//! the visitors of any 30-minute window are each counted at most once in it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use marsad_schemas::live::{LIVE_SLOT_SECONDS, LIVE_VISITS_PER_VISITOR_DAY, LIVE_WINDOW_MINUTES};
use marsad_schemas::{LiveCell, LivePage, LiveSource};

use super::clamp::{VisitorDayClamp, visitor_print};
use super::rows::{Col, EventRows, FastMap};

const WINDOW_SECONDS: i64 = LIVE_WINDOW_MINUTES * 60;
/// Distinct pages one slot keeps; past it, views go to [`OTHER_PAGES`] (a client can send
/// any number of paths).
const PAGES_PER_SLOT: usize = 5_000;
/// Where the views of pages past [`PAGES_PER_SLOT`] are counted.
pub const OTHER_PAGES: &str = "(other pages)";
/// Pages one visitor is remembered on (to count it once per page per half hour); past it,
/// its views still count but not as a visitor of a new page.
const PAGES_PER_VISITOR: usize = 64;
/// The path of a page view without one.
const NO_PATH: &str = "(none)";

#[derive(Default)]
struct Slot {
    /// Start, in seconds since 1970.
    start: i64,
    visitors: u64,
    page_views: u64,
    pages: PageCounts,
}

/// Views and visitors of each page in one cell.
type PageCounts = FastMap<Arc<str>, (u64, u64)>;

/// What is remembered of a visitor seen in the last half hour.
struct RecentVisitor {
    /// When it was last counted as arriving (processing time, seconds).
    counted_at: Option<i64>,
    /// When it was last seen.
    last_seen: i64,
    /// Pages it was counted on, and when.
    pages: Vec<(Arc<str>, i64)>,
}

struct LiveState {
    /// Oldest first.
    slots: VecDeque<Slot>,
    visitors: FastMap<u64, RecentVisitor>,
    events: VisitorDayClamp,
    visits: VisitorDayClamp,
}

/// The processor's live window, shared with the query service in the same process.
#[derive(Clone)]
pub struct LiveWindow {
    state: Arc<Mutex<LiveState>>,
}

impl LiveWindow {
    /// An empty window counting at most `max_events_per_visitor_day` events of a visitor-day.
    pub fn new(max_events_per_visitor_day: u32) -> Self {
        LiveWindow {
            state: Arc::new(Mutex::new(LiveState {
                slots: VecDeque::new(),
                visitors: FastMap::default(),
                events: VisitorDayClamp::new(max_events_per_visitor_day),
                visits: VisitorDayClamp::new(LIVE_VISITS_PER_VISITOR_DAY as u32),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LiveState> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Counts the rows of an `events` commit (`which`: those the rollups count) as processed
    /// at `now` (seconds since 1970).
    pub(crate) fn add(&self, rows: &EventRows, which: &[usize], now: i64) {
        let mut state = self.lock();
        state.forget_before(now);
        let slot_start = now - now.rem_euclid(LIVE_SLOT_SECONDS);
        if state.slots.back().is_none_or(|s| s.start < slot_start) {
            state.slots.push_back(Slot {
                start: slot_start,
                ..Slot::default()
            });
        }
        for &i in which {
            let ts = rows.ts.value(i);
            let happened = ts.div_euclid(1_000_000);
            if happened < now - WINDOW_SECONDS || happened > now + WINDOW_SECONDS {
                // too old for the live view (or a clock far ahead): the rollups have it
                continue;
            }
            let visitor = rows.get(Col::VisitorKey, i);
            if !state.events.admit(ts, visitor) {
                continue;
            }
            let page = (rows.get(Col::EventType, i) == Some("page_view"))
                .then(|| rows.get(Col::PagePath, i).unwrap_or(NO_PATH));
            state.count(ts, visitor, page, now);
        }
    }
}

impl LiveState {
    /// Forgets the cells and visitors older than the window at `now`.
    fn forget_before(&mut self, now: i64) {
        let oldest = now - now.rem_euclid(60) - WINDOW_SECONDS;
        while self.slots.front().is_some_and(|s| s.start < oldest) {
            self.slots.pop_front();
        }
        let cutoff = now - WINDOW_SECONDS;
        if self.visitors.len() > 1024 || self.slots.is_empty() {
            self.visitors.retain(|_, v| v.last_seen >= cutoff);
        }
    }

    fn count(&mut self, ts: i64, visitor: Option<&str>, page: Option<&str>, now: i64) {
        let Some(slot) = self.slots.back_mut() else {
            return;
        };
        let arrived_again = |at: Option<i64>| at.is_none_or(|at| now - at >= WINDOW_SECONDS);
        let (arrives, new_on_page) = match visitor {
            // without a cookie every event is a visitor of its own
            None => (self.visits.admit(ts, None), true),
            Some(key) => {
                let v = self.visitors.entry(visitor_print(key)).or_insert(RecentVisitor {
                    counted_at: None,
                    last_seen: now,
                    pages: Vec::new(),
                });
                v.last_seen = now;
                let arrives = arrived_again(v.counted_at) && self.visits.admit(ts, Some(key));
                if arrives {
                    v.counted_at = Some(now);
                }
                let new_on_page = page.is_some_and(|path| {
                    v.pages.retain(|(_, at)| now - at < WINDOW_SECONDS);
                    let seen = v.pages.iter().any(|(p, _)| &**p == path);
                    !seen && v.pages.len() < PAGES_PER_VISITOR
                });
                (arrives, new_on_page)
            }
        };
        if arrives {
            slot.visitors += 1;
        }
        let Some(path) = page else {
            return;
        };
        slot.page_views += 1;
        let path = if slot.pages.len() >= PAGES_PER_SLOT && !slot.pages.contains_key(path) {
            OTHER_PAGES
        } else {
            path
        };
        let key: Arc<str> = match slot.pages.get_key_value(path) {
            Some((k, _)) => k.clone(),
            None => Arc::from(path),
        };
        let cell = slot.pages.entry(key.clone()).or_default();
        cell.0 += 1;
        if new_on_page {
            cell.1 += 1;
            if let Some(v) = visitor.and_then(|k| self.visitors.get_mut(&visitor_print(k))) {
                v.pages.push((key, now));
            }
        }
    }
}

impl LiveSource for LiveWindow {
    fn cells(&self, now: i64) -> Vec<LiveCell> {
        let state = self.lock();
        let minute = now - now.rem_euclid(60);
        let oldest = minute - WINDOW_SECONDS + 60;
        let mut minutes: BTreeMap<i64, (u64, u64, PageCounts)> = BTreeMap::new();
        let mut current = Vec::new();
        for slot in &state.slots {
            if slot.start < oldest || slot.start + LIVE_SLOT_SECONDS > now {
                // before the window, or not ended yet
                continue;
            }
            if slot.start < minute {
                let m = minutes.entry(slot.start - slot.start.rem_euclid(60)).or_default();
                m.0 += slot.visitors;
                m.1 += slot.page_views;
                for (path, (views, visitors)) in &slot.pages {
                    let p = m.2.entry(path.clone()).or_default();
                    p.0 += views;
                    p.1 += visitors;
                }
            } else {
                current.push(cell(
                    slot.start,
                    LIVE_SLOT_SECONDS,
                    slot.visitors,
                    slot.page_views,
                    &slot.pages,
                ));
            }
        }
        let mut cells: Vec<LiveCell> = minutes
            .into_iter()
            .map(|(start, (visitors, page_views, pages))| cell(start, 60, visitors, page_views, &pages))
            .collect();
        cells.extend(current);
        cells
    }
}

fn cell(start: i64, seconds: i64, visitors: u64, page_views: u64, pages: &PageCounts) -> LiveCell {
    let mut pages: Vec<LivePage> = pages
        .iter()
        .map(|(path, &(page_views, visitors))| LivePage {
            path: path.clone(),
            page_views,
            visitors,
        })
        .collect();
    pages.sort_by(|a, b| a.path.cmp(&b.path));
    LiveCell {
        start,
        seconds,
        visitors,
        page_views,
        pages,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollup::test_batch;

    const NOW: i64 = 1_790_000_000 - 1_790_000_000 % 60 + 10;

    fn add(live: &LiveWindow, rows: &[(&str, &str, i64, &str, &str)], now: i64) {
        let batch = test_batch(rows);
        let rows = EventRows::new(&batch).expect("rows");
        let which: Vec<usize> = (0..rows.len()).collect();
        live.add(&rows, &which, now);
    }

    fn totals(cells: &[LiveCell]) -> (u64, u64) {
        cells
            .iter()
            .fold((0, 0), |(v, p), c| (v + c.visitors, p + c.page_views))
    }

    #[test]
    fn an_event_appears_once_its_slot_has_ended_and_stays_until_the_window_passes() {
        let live = LiveWindow::new(40);
        let minute = NOW / 60;
        add(&live, &[("v1", "s1", minute, "cars", "page_view")], NOW);
        assert!(live.cells(NOW).is_empty(), "the slot is still open");
        let later = NOW + LIVE_SLOT_SECONDS;
        assert_eq!(totals(&live.cells(later)), (1, 1));
        // the same cell, however often and whenever it is asked, until it leaves the window
        let first = live.cells(later);
        add(&live, &[("v2", "s2", minute, "cars", "page_view")], later);
        assert_eq!(live.cells(later), first, "an ended cell never changes");
        assert_eq!(totals(&live.cells(NOW + 29 * 60)), (2, 2));
        assert_eq!(totals(&live.cells(NOW + 31 * 60)), (0, 0));
    }

    #[test]
    fn events_that_happened_over_half_an_hour_ago_are_not_live() {
        let live = LiveWindow::new(40);
        let old = NOW / 60 - 31;
        add(&live, &[("v1", "s1", old, "cars", "page_view")], NOW);
        assert_eq!(totals(&live.cells(NOW + 5)), (0, 0));
    }

    #[test]
    fn a_visitor_counts_once_per_half_hour_and_the_clamps_hold() {
        let live = LiveWindow::new(3);
        let minute = NOW / 60;
        let rows: Vec<_> = (0..10).map(|_| ("v1", "s1", minute, "cars", "page_view")).collect();
        add(&live, &rows, NOW);
        let cells = live.cells(NOW + 60);
        // three events of the visitor-day count; one arrival
        assert_eq!(totals(&cells), (1, 3));
        let page: u64 = cells.iter().flat_map(|c| &c.pages).map(|p| p.visitors).sum();
        assert_eq!(page, 1, "a visitor of the page once");
        // arrivals: at most four a day, each 30 minutes after the last
        let live = LiveWindow::new(40);
        let mut arrivals = 0;
        for k in 0..8 {
            let now = NOW + k * 1800;
            add(&live, &[("v1", "s1", now / 60, "cars", "ad_click")], now);
            // seen again a minute later: not a new arrival
            add(&live, &[("v1", "s1", now / 60 + 1, "cars", "ad_click")], now + 60);
            arrivals += totals(&live.cells(now + 120)).0;
        }
        assert_eq!(arrivals, LIVE_VISITS_PER_VISITOR_DAY);
    }

    #[test]
    fn ended_minutes_are_summed_and_the_current_minute_is_in_slots() {
        let live = LiveWindow::new(40);
        let minute = NOW / 60;
        add(&live, &[("v1", "s1", minute, "cars", "page_view")], NOW);
        add(&live, &[("v2", "s2", minute, "cars", "page_view")], NOW + 2);
        let next = NOW - NOW % 60 + 60 + 4;
        add(&live, &[("v3", "s3", minute + 1, "cars", "page_view")], next - 4);
        let cells = live.cells(next);
        assert_eq!(cells.first().map(|c| (c.seconds, c.page_views)), Some((60, 2)));
        assert!(cells[1..].iter().all(|c| c.seconds == LIVE_SLOT_SECONDS));
        assert_eq!(totals(&cells), (3, 3));
    }
}
