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

use super::clamp::VisitorDayClamp;
use super::rows::{Col, EventRows, FastMap};

const WINDOW_SECONDS: i64 = LIVE_WINDOW_MINUTES * 60;
/// Distinct pages one slot keeps; past it, views go to [`OTHER_PAGES`] (a client can send
/// any number of paths).
const PAGES_PER_SLOT: usize = 500;
/// Distinct pages one ended minute keeps: the most viewed (then by path), the rest summed
/// into [`OTHER_PAGES`]. Which is kept depends only on the minute's counts, so the minute is
/// the same whenever it is summed.
const PAGES_PER_MINUTE: usize = 1_000;
/// Longer paths are counted under [`OTHER_PAGES`] (they hold no page a marketer looks for).
const MAX_PATH_CHARS: usize = 256;
/// Where the views of pages past the limits are counted.
pub const OTHER_PAGES: &str = "(other pages)";
/// Pages one visitor is remembered on (to count it once per page per half hour); past it,
/// its views still count but not as a visitor of a new page.
const PAGES_PER_VISITOR: usize = 64;
/// The path of a page view without one.
const NO_PATH: &str = "(none)";

/// Views and visitors of each page in one cell.
type PageCounts = FastMap<Arc<str>, (u64, u64)>;

#[derive(Default, Clone)]
struct Counts {
    visitors: u64,
    page_views: u64,
    pages: PageCounts,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.visitors += other.visitors;
        self.page_views += other.page_views;
        for (path, (views, visitors)) in &other.pages {
            let p = self.pages.entry(path.clone()).or_default();
            p.0 += views;
            p.1 += visitors;
        }
    }

    /// Keeps the [`PAGES_PER_MINUTE`] most viewed pages, the rest under [`OTHER_PAGES`].
    fn capped(mut self) -> Counts {
        if self.pages.len() <= PAGES_PER_MINUTE {
            return self;
        }
        let mut pages: Vec<(Arc<str>, (u64, u64))> = self.pages.drain().collect();
        pages.sort_by(|a, b| b.1.0.cmp(&a.1.0).then_with(|| a.0.cmp(&b.0)));
        let other: Arc<str> = Arc::from(OTHER_PAGES);
        for (i, (path, counts)) in pages.into_iter().enumerate() {
            let key = if i < PAGES_PER_MINUTE - 1 { path } else { other.clone() };
            let p = self.pages.entry(key).or_default();
            p.0 += counts.0;
            p.1 += counts.1;
        }
        self
    }
}

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
    /// Slots of the minute being counted, by start.
    slots: BTreeMap<i64, Counts>,
    /// Ended minutes, summed, by start.
    minutes: VecDeque<(i64, Counts)>,
    /// Nothing is added before this (seconds): cells that ended by it may have been released.
    released_until: i64,
    /// The latest time counted at (a clock that steps back counts on from here).
    counted_until: i64,
    visitors: FastMap<u64, RecentVisitor>,
    events: VisitorDayClamp,
    visits: VisitorDayClamp,
}

/// The processor's live window, shared with the query service in the same process.
#[derive(Clone)]
pub struct LiveWindow {
    state: Arc<Mutex<LiveState>>,
    instance: Arc<str>,
}

fn minute_of(secs: i64) -> i64 {
    secs - secs.rem_euclid(60)
}

impl LiveWindow {
    /// An empty window counting at most `max_events_per_visitor_day` events of a visitor-day.
    pub fn new(max_events_per_visitor_day: u32) -> Self {
        LiveWindow {
            state: Arc::new(Mutex::new(LiveState {
                slots: BTreeMap::new(),
                minutes: VecDeque::new(),
                released_until: 0,
                counted_until: 0,
                visitors: FastMap::default(),
                events: VisitorDayClamp::new(max_events_per_visitor_day),
                visits: VisitorDayClamp::new(LIVE_VISITS_PER_VISITOR_DAY as u32),
            })),
            instance: Arc::from(format!("{:016x}", rand::random::<u64>())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LiveState> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Counts the rows of an `events` commit (`which`: those the rollups count) as processed
    /// now, by `clock` (seconds since 1970), read under the lock: never into a cell that ended
    /// before the last time cells were read.
    pub(crate) fn add(&self, rows: &EventRows, which: &[usize], clock: impl Fn() -> i64) {
        let mut state = self.lock();
        let now = clock().max(state.released_until).max(state.counted_until);
        state.counted_until = now;
        state.end_minutes_before(minute_of(now));
        state.forget_before(now);
        let slot_start = now - now.rem_euclid(LIVE_SLOT_SECONDS);
        for &i in which {
            let happened = rows.ts.value(i).div_euclid(1_000_000);
            if happened < now - WINDOW_SECONDS || happened > now + WINDOW_SECONDS {
                // too old for the live view (or a clock far ahead): the rollups have it
                continue;
            }
            // without a cookie nothing ties two events to one person: the clamp could not hold
            let Some(visitor) = rows.visitor(i) else {
                continue;
            };
            // clamped by the day it is counted on (the client's clock does not pick the day)
            if !state.events.admit(now * 1_000_000, Some(visitor)) {
                continue;
            }
            let page = (rows.get(Col::EventType, i) == Some("page_view"))
                .then(|| rows.get(Col::PagePath, i).unwrap_or(NO_PATH));
            state.count(slot_start, visitor, page, now);
        }
    }
}

impl LiveState {
    /// Sums the slots of minutes before `minute` into their minutes.
    fn end_minutes_before(&mut self, minute: i64) {
        while let Some((&start, _)) = self.slots.first_key_value() {
            let m = minute_of(start);
            if m >= minute {
                break;
            }
            let ended = self.minute_from_slots(m);
            self.slots.retain(|s, _| minute_of(*s) != m);
            self.minutes.push_back((m, ended));
        }
    }

    /// The counts of minute `m` from its slots (ended or not yet summed).
    fn minute_from_slots(&self, m: i64) -> Counts {
        let mut sum = Counts::default();
        for (_, slot) in self.slots.range(m..m + 60) {
            sum.add(slot);
        }
        sum.capped()
    }

    /// Forgets the minutes and visitors older than the window at `now`.
    fn forget_before(&mut self, now: i64) {
        let oldest = minute_of(now) - WINDOW_SECONDS;
        while self.minutes.front().is_some_and(|(m, _)| *m < oldest) {
            self.minutes.pop_front();
        }
        let cutoff = now - WINDOW_SECONDS;
        if self.visitors.len() > 1024 {
            self.visitors.retain(|_, v| v.last_seen >= cutoff);
        }
    }

    fn count(&mut self, slot_start: i64, visitor: u64, page: Option<&str>, now: i64) {
        let v = self.visitors.entry(visitor).or_insert(RecentVisitor {
            counted_at: None,
            last_seen: now,
            pages: Vec::new(),
        });
        v.last_seen = now;
        let again = v.counted_at.is_none_or(|at| now - at >= WINDOW_SECONDS);
        let arrives = again && self.visits.admit(now * 1_000_000, Some(visitor));
        if arrives {
            v.counted_at = Some(now);
        }
        let slot = self.slots.entry(slot_start).or_default();
        if arrives {
            slot.visitors += 1;
        }
        let Some(path) = page else {
            return;
        };
        slot.page_views += 1;
        let path = if path.chars().count() > MAX_PATH_CHARS
            || (slot.pages.len() >= PAGES_PER_SLOT && !slot.pages.contains_key(path))
        {
            OTHER_PAGES
        } else {
            path
        };
        let key: Arc<str> = match slot.pages.get_key_value(path) {
            Some((k, _)) => k.clone(),
            None => Arc::from(path),
        };
        v.pages.retain(|(_, at)| now - at < WINDOW_SECONDS);
        let new_on_page = !v.pages.iter().any(|(p, _)| *p == key) && v.pages.len() < PAGES_PER_VISITOR;
        if new_on_page {
            v.pages.push((key.clone(), now));
        }
        let cell = slot.pages.entry(key).or_default();
        cell.0 += 1;
        if new_on_page {
            cell.1 += 1;
        }
    }
}

impl LiveSource for LiveWindow {
    fn cells(&self, now: i64) -> Vec<LiveCell> {
        let mut state = self.lock();
        // nothing is added from here on to a cell this answer may hold
        state.released_until = state.released_until.max(now);
        let minute = minute_of(now);
        let mut cells = Vec::new();
        for m in (1..LIVE_WINDOW_MINUTES).rev().map(|back| minute - back * 60) {
            let counts = match state.minutes.iter().find(|(start, _)| *start == m) {
                Some((_, c)) => c.clone(),
                // ended, but nothing was counted since to sum it
                None => state.minute_from_slots(m),
            };
            cells.push(cell(m, 60, &counts));
        }
        let mut start = minute;
        while start + LIVE_SLOT_SECONDS <= now {
            let counts = state.slots.get(&start).cloned().unwrap_or_default();
            cells.push(cell(start, LIVE_SLOT_SECONDS, &counts));
            start += LIVE_SLOT_SECONDS;
        }
        cells
    }

    fn instance(&self) -> &str {
        &self.instance
    }
}

fn cell(start: i64, seconds: i64, counts: &Counts) -> LiveCell {
    let mut pages: Vec<LivePage> = counts
        .pages
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
        visitors: counts.visitors,
        page_views: counts.page_views,
        pages,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollup::test_batch;

    /// Ten seconds into a minute.
    const NOW: i64 = 1_790_000_000 - 1_790_000_000 % 60 + 10;

    fn add(live: &LiveWindow, rows: &[(&str, &str, i64, &str, &str)], now: i64) {
        let batch = test_batch(rows);
        let rows = EventRows::new(&batch).expect("rows");
        let which: Vec<usize> = (0..rows.len()).collect();
        live.add(&rows, &which, || now);
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
        assert_eq!(totals(&live.cells(NOW + 1)), (0, 0), "the slot is still open");
        let later = NOW + LIVE_SLOT_SECONDS;
        assert_eq!(totals(&live.cells(later)), (1, 1));
        assert_eq!(totals(&live.cells(NOW + 29 * 60)), (1, 1));
        assert_eq!(totals(&live.cells(NOW + 31 * 60)), (0, 0));
    }

    #[test]
    fn a_cell_once_asked_for_is_never_added_to() {
        let live = LiveWindow::new(40);
        let minute = NOW / 60;
        add(&live, &[("v1", "s1", minute, "cars", "page_view")], NOW);
        let asked = live.cells(NOW + LIVE_SLOT_SECONDS);
        // the processor read its clock before the answer, and counts after it
        add(&live, &[("v2", "s2", minute, "cars", "page_view")], NOW);
        assert_eq!(
            live.cells(NOW + LIVE_SLOT_SECONDS),
            asked,
            "an ended cell never changes"
        );
        // the event is not lost: it is in the next slot
        assert_eq!(totals(&live.cells(NOW + 2 * LIVE_SLOT_SECONDS)), (2, 2));
        // a clock that steps back counts on from where it was
        add(&live, &[("v3", "s3", minute, "cars", "page_view")], NOW - 120);
        assert_eq!(
            live.cells(NOW + 2 * LIVE_SLOT_SECONDS).len(),
            live.cells(NOW + 2 * LIVE_SLOT_SECONDS + 1).len()
        );
        assert_eq!(totals(&live.cells(NOW + 3 * LIVE_SLOT_SECONDS)), (3, 3));
    }

    #[test]
    fn which_cells_exist_says_nothing_about_what_was_counted() {
        let quiet = LiveWindow::new(40);
        let busy = LiveWindow::new(40);
        add(&busy, &[("v1", "s1", NOW / 60, "cars", "page_view")], NOW);
        let shape = |cells: Vec<LiveCell>| cells.iter().map(|c| (c.start, c.seconds)).collect::<Vec<_>>();
        let at = NOW + 5 * 60 + 7;
        assert_eq!(shape(quiet.cells(at)), shape(busy.cells(at)));
        // 29 ended minutes, then the ended slots of this one
        let cells = quiet.cells(at);
        assert_eq!(cells.iter().filter(|c| c.seconds == 60).count(), 29);
        // (17 s into it: the slots from 0 s to 14 s have ended)
        assert_eq!(cells.iter().filter(|c| c.seconds == LIVE_SLOT_SECONDS).count(), 8);
        assert_ne!(quiet.instance(), busy.instance(), "each window is its own");
    }

    #[test]
    fn events_that_happened_over_half_an_hour_ago_are_not_live() {
        let live = LiveWindow::new(40);
        add(&live, &[("v1", "s1", NOW / 60 - 31, "cars", "page_view")], NOW);
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
    fn ended_minutes_are_summed_the_same_whenever_and_the_current_minute_is_in_slots() {
        let live = LiveWindow::new(40);
        let minute = NOW / 60;
        add(&live, &[("v1", "s1", minute, "cars", "page_view")], NOW);
        add(&live, &[("v2", "s2", minute, "cars", "page_view")], NOW + 2);
        let next = NOW - NOW % 60 + 60 + 4;
        // summed from its slots before anything is counted in the next minute, then after
        let before = live.cells(next - 3);
        add(&live, &[("v3", "s3", minute + 1, "cars", "page_view")], next - 3);
        let after = live.cells(next);
        let ended = |cells: &[LiveCell]| cells.iter().find(|c| c.start == NOW - NOW % 60).cloned();
        assert_eq!(ended(&before), ended(&after));
        assert_eq!(ended(&after).map(|c| (c.seconds, c.page_views)), Some((60, 2)));
        assert_eq!(totals(&after), (3, 3));
    }

    #[test]
    fn a_minute_keeps_its_most_viewed_pages_and_sums_the_rest() {
        let mut counts = Counts::default();
        for i in 0..(PAGES_PER_MINUTE + 10) {
            counts
                .pages
                .insert(Arc::from(format!("/p{i}")), (1 + (i % 3) as u64, 1));
        }
        let total: u64 = counts.pages.values().map(|p| p.0).sum();
        let capped = counts.capped();
        assert_eq!(capped.pages.len(), PAGES_PER_MINUTE);
        assert_eq!(capped.pages.values().map(|p| p.0).sum::<u64>(), total, "nothing lost");
        assert!(capped.pages.contains_key(OTHER_PAGES));
    }
}
