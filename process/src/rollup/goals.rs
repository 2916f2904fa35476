//! `goals_hourly` and `funnels_hourly`: conversions of the goals and the
//! steps of the funnels defined in `[[process.goals]]` and
//! `[[process.funnels]]`.
//!
//! A goal counts its matching events (`conversions`) and the visitors who
//! converted (a sketch), per hour, goal, country and device. An event may
//! convert for several goals, and a session reach steps of several funnels:
//! the clamp counts what a visitor adds to the table (conversions, steps
//! reached), not their events, so one visitor-day moves any sum of the table,
//! across goals or steps too, by at most C. A funnel is
//! counted from session state in the processor: a session reaches step k when
//! an event matching step k comes after it reached step k-1 (other events may
//! come between), and each step a session reaches adds one to `sessions` in
//! the cell of the session's first event. Within a session, not across days:
//! visitor keys change every day by design, so a funnel over N days would
//! need the long-lived id the privacy model keeps out of analytics.

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryBuilder, Date32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow::record_batch::RecordBatch;
use datasketches::hll::HllSketch;
use marsad_config::{EventMatch, FunnelDefinition, GoalDefinition};
use marsad_schemas::{funnels_hourly_schema, goals_hourly_schema};

use super::Rollup;
use super::clamp::VisitorDayClamp;
use super::rows::{
    Col, EventRows, FastMap, INTERNED_MAX, Interner, MICROS_PER_DAY, MICROS_PER_HOUR, SessionPrint, hour_within_days,
    new_sketch, replay_rows,
};
use super::traffic::SESSION_MEMORY_MICROS;
use crate::Result;
use crate::dedup::IdFingerprints;

/// Whether `text` matches `pattern`, where `*` stands for any run of characters.
fn glob_matches(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // no `*`: the whole text
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// An [`EventMatch`], ready to test rows.
#[derive(Debug, Clone)]
pub(crate) struct EventMatcher(EventMatch);

impl EventMatcher {
    pub(crate) fn new(event: &EventMatch) -> Self {
        EventMatcher(event.clone())
    }

    fn matches(&self, rows: &EventRows, i: usize) -> bool {
        let is = |want: &Option<String>, col: Col| want.as_deref().is_none_or(|w| rows.get(col, i) == Some(w));
        is(&self.0.event_type, Col::EventType)
            && is(&self.0.page_category, Col::PageCategory)
            && is(&self.0.campaign_id, Col::CampaignId)
            && self
                .0
                .path
                .as_deref()
                .is_none_or(|p| rows.get(Col::PagePath, i).is_some_and(|path| glob_matches(p, path)))
    }
}

/// The goals, ready to test rows.
pub(crate) fn goal_matchers(goals: &[GoalDefinition]) -> Vec<(String, EventMatcher)> {
    goals
        .iter()
        .map(|g| (g.id.clone(), EventMatcher::new(&g.event())))
        .collect()
}

/// The funnels, ready to test rows.
pub(crate) fn funnel_matchers(funnels: &[FunnelDefinition]) -> Vec<(String, Vec<EventMatcher>)> {
    funnels
        .iter()
        .map(|f| (f.id.clone(), f.steps.iter().map(EventMatcher::new).collect()))
        .collect()
}

/// A cell's key: the hour, the goal or funnel (its index), the step (funnels), and the codes of
/// the country and device.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct CellKey {
    hour: i64,
    which: u16,
    step: u8,
    dims: [u32; 2],
}

struct Cell {
    count: i64,
    visitors: HllSketch,
}

impl Default for Cell {
    fn default() -> Self {
        Cell {
            count: 0,
            visitors: new_sketch(),
        }
    }
}

const DIMENSIONS: [Col; 2] = [Col::Country, Col::DeviceType];

fn key_of(values: &mut Interner, rows: &EventRows, i: usize, which: u16, step: u8) -> CellKey {
    let ts = rows.ts.value(i);
    CellKey {
        hour: ts - ts.rem_euclid(MICROS_PER_HOUR),
        which,
        step,
        dims: DIMENSIONS.map(|col| values.code(rows.get(col, i))),
    }
}

/// The batch of `cells` in `schema`: hour, date, the id of `names[which]`, the step (if
/// `steps`), country, device, the count and the sketch.
fn batch_of(
    cells: FastMap<CellKey, Cell>,
    values: &Interner,
    names: &[String],
    steps: bool,
    schema: arrow::datatypes::SchemaRef,
) -> Result<RecordBatch> {
    let mut hour = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut date = Date32Builder::new();
    let mut id = StringBuilder::new();
    let mut step = StringBuilder::new();
    let mut dims: Vec<StringBuilder> = (0..DIMENSIONS.len()).map(|_| StringBuilder::new()).collect();
    let mut count = Int64Builder::new();
    let mut visitors = BinaryBuilder::new();
    for (k, c) in cells {
        hour.append_value(k.hour);
        date.append_value(k.hour.div_euclid(MICROS_PER_DAY) as i32);
        id.append_value(names.get(usize::from(k.which)).map_or("", String::as_str));
        step.append_value(k.step.to_string());
        for (b, &v) in dims.iter_mut().zip(&k.dims) {
            b.append_option(values.value(v));
        }
        count.append_value(c.count);
        visitors.append_value(c.visitors.serialize());
    }
    let mut columns: Vec<ArrayRef> = vec![Arc::new(hour.finish()), Arc::new(date.finish()), Arc::new(id.finish())];
    if steps {
        columns.push(Arc::new(step.finish()));
    }
    columns.extend(dims.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    columns.push(Arc::new(count.finish()));
    columns.push(Arc::new(visitors.finish()));
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// `goals_hourly`: conversions and converting visitors per goal.
pub(super) struct GoalsRollup {
    goals: Arc<Vec<(String, EventMatcher)>>,
    names: Vec<String>,
    cells: FastMap<CellKey, Cell>,
    values: Interner,
    clamp: VisitorDayClamp,
}

impl GoalsRollup {
    pub(super) fn new(clamp: VisitorDayClamp, goals: Arc<Vec<(String, EventMatcher)>>) -> Self {
        GoalsRollup {
            names: goals.iter().map(|(id, _)| id.clone()).collect(),
            goals,
            cells: FastMap::default(),
            values: Interner::default(),
            clamp,
        }
    }
}

impl Rollup for GoalsRollup {
    fn retain_days(&mut self, first: i32, last: i32) {
        self.cells.retain(|k, _| hour_within_days(k.hour, first, last));
    }

    fn add(&mut self, rows: &EventRows, which: &[usize]) {
        for &i in which {
            for (g, (_, matcher)) in self.goals.iter().enumerate() {
                // each conversion takes the visitor's day towards the clamp
                if matcher.matches(rows, i) && self.clamp.admit(rows.ts.value(i), rows.visitor(i)) {
                    let key = key_of(&mut self.values, rows, i, g as u16, 0);
                    let cell = self.cells.entry(key).or_default();
                    cell.count += 1;
                    if let Some(v) = rows.get(Col::VisitorKey, i) {
                        cell.visitors.update(v);
                    }
                }
            }
        }
    }

    fn preload_clamp(&mut self, day: i32, visitor: &str, events: u64, _ad_events: u64) {
        // each event converts for every goal at most: what it may have converted, so the
        // clamp holds across a restart (erring on the side of counting less)
        self.clamp
            .preload(day, visitor, events.saturating_mul(self.goals.len() as u64));
    }

    fn take(&mut self) -> Result<RecordBatch> {
        let cells = std::mem::take(&mut self.cells);
        let batch = batch_of(cells, &self.values, &self.names, false, goals_hourly_schema())?;
        if self.values.len() > INTERNED_MAX {
            self.values = Interner::default();
        }
        Ok(batch)
    }
}

/// A session's progress through every funnel.
struct Progress {
    /// Steps reached, per funnel.
    reached: Vec<u8>,
    /// The cell of the session's first event (hour, country, device codes).
    start: CellKey,
    last: i64,
}

/// `funnels_hourly`: sessions reaching each step of each funnel.
pub(super) struct FunnelsRollup {
    funnels: Arc<Vec<(String, Vec<EventMatcher>)>>,
    names: Vec<String>,
    cells: FastMap<CellKey, Cell>,
    open: FastMap<SessionPrint, Progress>,
    values: Interner,
    watermark: i64,
    clamp: VisitorDayClamp,
}

impl FunnelsRollup {
    pub(super) fn new(clamp: VisitorDayClamp, funnels: Arc<Vec<(String, Vec<EventMatcher>)>>) -> Self {
        FunnelsRollup {
            names: funnels.iter().map(|(id, _)| id.clone()).collect(),
            funnels,
            cells: FastMap::default(),
            open: FastMap::default(),
            values: Interner::default(),
            watermark: 0,
            clamp,
        }
    }

    /// Follows a row's session through the funnels; with `count`, adds the steps it reaches.
    fn observe(&mut self, rows: &EventRows, i: usize, count: bool) {
        let ts = rows.ts.value(i);
        self.watermark = self.watermark.max(ts);
        if self.funnels.is_empty() {
            return;
        }
        let Some(session) = rows.session(i) else {
            return;
        };
        if !self.open.contains_key(&session) {
            let start = key_of(&mut self.values, rows, i, 0, 0);
            self.open.insert(
                session,
                Progress {
                    reached: vec![0; self.funnels.len()],
                    start,
                    last: ts,
                },
            );
        }
        let Some(progress) = self.open.get_mut(&session) else {
            return;
        };
        progress.last = progress.last.max(ts);
        for (f, (_, steps)) in self.funnels.iter().enumerate() {
            let reached = progress.reached[f];
            let Some(next) = steps.get(usize::from(reached)) else {
                continue;
            };
            if next.matches(rows, i) {
                progress.reached[f] = reached + 1;
                // each step reached takes the visitor's day towards the clamp (one past it
                // still moves the session on, and counts nowhere)
                if count && self.clamp.admit(ts, rows.visitor(i)) {
                    let key = CellKey {
                        which: f as u16,
                        step: reached + 1,
                        ..progress.start
                    };
                    let cell = self.cells.entry(key).or_default();
                    cell.count += 1;
                    if let Some(v) = rows.get(Col::VisitorKey, i) {
                        cell.visitors.update(v);
                    }
                }
            }
        }
    }

    fn forget_idle(&mut self) {
        let cutoff = self.watermark - SESSION_MEMORY_MICROS;
        self.open.retain(|_, s| s.last >= cutoff);
    }
}

impl Rollup for FunnelsRollup {
    fn retain_days(&mut self, first: i32, last: i32) {
        self.cells.retain(|k, _| hour_within_days(k.hour, first, last));
    }

    fn add(&mut self, rows: &EventRows, which: &[usize]) {
        for &i in which {
            self.observe(rows, i, true);
        }
        self.forget_idle();
    }

    fn preload_clamp(&mut self, day: i32, visitor: &str, events: u64, _ad_events: u64) {
        // each event takes every funnel a step at most
        self.clamp
            .preload(day, visitor, events.saturating_mul(self.funnels.len() as u64));
    }

    fn replay_sessions(&mut self, batch: &RecordBatch, skip: &IdFingerprints) -> Result<()> {
        replay_rows(batch, skip, |rows, i| self.observe(rows, i, false))?;
        self.forget_idle();
        Ok(())
    }

    fn take(&mut self) -> Result<RecordBatch> {
        let cells = std::mem::take(&mut self.cells);
        let batch = batch_of(cells, &self.values, &self.names, true, funnels_hourly_schema())?;
        // the cells are empty now: only the open sessions' first events hold codes
        if self.values.len() > INTERNED_MAX {
            self.values
                .rebuild(self.open.values_mut().map(|s| &mut s.start.dims[..]));
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::rollup::rows::test_batch as batch;

    #[test]
    fn globs_match_whole_paths() {
        assert!(glob_matches("/cars", "/cars"));
        assert!(!glob_matches("/cars", "/cars/1"));
        assert!(glob_matches("/cars/*", "/cars/1"));
        assert!(glob_matches("*/cars/*", "/ar/cars/kia"));
        assert!(glob_matches("/*/post/*/done", "/en/post/123/done"));
        assert!(!glob_matches("/*/post/*/done", "/en/post/123/edit"));
        assert!(glob_matches("*", ""));
        assert!(!glob_matches("/a*a", "/a"), "the parts do not overlap");
    }

    fn step(event_type: &str, category: Option<&str>) -> EventMatch {
        EventMatch {
            event_type: Some(event_type.into()),
            page_category: category.map(str::to_owned),
            ..EventMatch::default()
        }
    }

    /// (id, step) -> sessions, summed over the batch.
    fn per_step(b: &RecordBatch) -> BTreeMap<(String, String), i64> {
        let mut out = BTreeMap::new();
        let text = |name: &str, r: usize| {
            arrow::util::display::array_value_to_string(b.column_by_name(name).expect("column"), r).expect("text")
        };
        for r in 0..b.num_rows() {
            let n: i64 = text("sessions", r).parse().expect("a count");
            *out.entry((text("funnel_id", r), text("step", r))).or_default() += n;
        }
        out
    }

    #[test]
    fn a_funnel_counts_steps_in_order_within_a_session_across_commits() {
        let funnel = vec![(
            "cars-to-signup".to_owned(),
            vec![
                EventMatcher::new(&step("page_view", Some("cars"))),
                EventMatcher::new(&step("ad_click", None)),
                EventMatcher::new(&step("signup", None)),
            ],
        )];
        let mut t = FunnelsRollup::new(VisitorDayClamp::new(100), Arc::new(funnel));
        // s1: cars, click, (next commit) signup: all three; s2: a click before any cars page
        // does not count, then cars: step 1 only; s3: jobs only: nothing
        let first = batch(&[
            ("v1", "s1", 0, "cars", "page_view"),
            ("v2", "s2", 0, "jobs", "ad_click"),
            ("v1", "s1", 1, "cars", "ad_click"),
            ("v2", "s2", 2, "cars", "page_view"),
            ("v3", "s3", 2, "jobs", "page_view"),
        ]);
        t.add(&EventRows::new(&first).expect("rows"), &[0, 1, 2, 3, 4]);
        let a = t.take().expect("batch");
        let second = batch(&[("v1", "s1", 70, "cars", "signup"), ("v1", "s1", 71, "cars", "signup")]);
        t.add(&EventRows::new(&second).expect("rows"), &[0, 1]);
        let b = t.take().expect("batch");
        let mut steps = per_step(&a);
        for (k, n) in per_step(&b) {
            *steps.entry(k).or_default() += n;
        }
        let id = |s: &str| ("cars-to-signup".to_owned(), s.to_owned());
        assert_eq!(steps, BTreeMap::from([(id("1"), 2), (id("2"), 1), (id("3"), 1)]));
        // the last step is counted in the cell of the session's first event (its hour)
        let hours = b.column_by_name("hour").expect("hour");
        let hours = hours
            .as_any()
            .downcast_ref::<arrow::array::TimestampMicrosecondArray>()
            .expect("ts");
        assert_eq!(hours.value(0), 0);
    }

    /// One event converting for three goals uses three of the visitor-day's clamp: no sum of
    /// the table, across goals either, moves by more than the clamp for one visitor-day.
    #[test]
    fn the_clamp_counts_conversions_not_events() {
        let any_click = || EventMatcher::new(&step("ad_click", None));
        let goals = vec![
            ("a".to_owned(), any_click()),
            ("b".to_owned(), any_click()),
            ("c".to_owned(), any_click()),
        ];
        let mut t = GoalsRollup::new(VisitorDayClamp::new(2), Arc::new(goals));
        let rows = batch(&[("v1", "s1", 0, "cars", "ad_click"), ("v1", "s1", 1, "cars", "ad_click")]);
        t.add(&EventRows::new(&rows).expect("rows"), &[0, 1]);
        let out = t.take().expect("batch");
        let conversions = out.column_by_name("conversions").expect("column");
        let conversions = conversions
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .expect("int64");
        assert_eq!(
            conversions.iter().flatten().sum::<i64>(),
            2,
            "six matches, a clamp of two"
        );
    }

    #[test]
    fn a_goal_counts_matching_events_and_their_visitors() {
        let goals = vec![
            ("clicked".to_owned(), EventMatcher::new(&step("ad_click", None))),
            (
                "cars-pages".to_owned(),
                EventMatcher::new(&EventMatch {
                    path: Some("/car*".into()),
                    ..EventMatch::default()
                }),
            ),
        ];
        let mut t = GoalsRollup::new(VisitorDayClamp::new(100), Arc::new(goals));
        let rows = batch(&[
            ("v1", "s1", 0, "cars", "page_view"),
            ("v1", "s1", 1, "cars", "ad_click"),
            ("v2", "s2", 1, "jobs", "ad_click"),
        ]);
        t.add(&EventRows::new(&rows).expect("rows"), &[0, 1, 2]);
        let out = t.take().expect("batch");
        let mut per_goal: BTreeMap<String, i64> = BTreeMap::new();
        for r in 0..out.num_rows() {
            let text = |name: &str| {
                arrow::util::display::array_value_to_string(out.column_by_name(name).expect("column"), r).expect("text")
            };
            *per_goal.entry(text("goal_id")).or_default() += text("conversions").parse::<i64>().expect("count");
        }
        assert_eq!(
            per_goal,
            BTreeMap::from([("cars-pages".to_owned(), 2), ("clicked".to_owned(), 2)])
        );
    }
}
