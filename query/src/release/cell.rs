//! The canonical identity of a released number: which rollup, which measure,
//! and the set of rows it sums, described by a constraint per dimension and a
//! time range. Two paths to the same set of rows — a report row, a report's
//! total under a filter, an analyst's SQL, an advertiser's view — build the
//! same identity, so they get the same noise.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDate, Utc};

/// What the rows of one dimension may hold.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Constraint {
    /// One of these values (equality is a set of one).
    OneOf(BTreeSet<String>),
    /// A range of values compared as text: (lower, inclusive), (upper, inclusive).
    Range {
        /// Lower bound and whether it is included.
        lower: Option<(String, bool)>,
        /// Upper bound and whether it is included.
        upper: Option<(String, bool)>,
    },
    /// No row can match (two equalities that disagree).
    Nothing,
}

impl Constraint {
    /// Both constraints at once.
    pub fn and(self, other: Constraint) -> Constraint {
        match (self, other) {
            (Constraint::Nothing, _) | (_, Constraint::Nothing) => Constraint::Nothing,
            (Constraint::OneOf(a), Constraint::OneOf(b)) => {
                let both: BTreeSet<String> = a.intersection(&b).cloned().collect();
                if both.is_empty() {
                    Constraint::Nothing
                } else {
                    Constraint::OneOf(both)
                }
            }
            (Constraint::OneOf(a), range @ Constraint::Range { .. })
            | (range @ Constraint::Range { .. }, Constraint::OneOf(a)) => {
                let kept: BTreeSet<String> = a.into_iter().filter(|v| range.admits(v)).collect();
                if kept.is_empty() {
                    Constraint::Nothing
                } else {
                    Constraint::OneOf(kept)
                }
            }
            (Constraint::Range { lower: l1, upper: u1 }, Constraint::Range { lower: l2, upper: u2 }) => {
                Constraint::Range {
                    lower: tighter(l1, l2, std::cmp::Ordering::Greater),
                    upper: tighter(u1, u2, std::cmp::Ordering::Less),
                }
            }
        }
    }

    fn admits(&self, v: &str) -> bool {
        match self {
            Constraint::OneOf(set) => set.contains(v),
            Constraint::Nothing => false,
            Constraint::Range { lower, upper } => {
                lower
                    .as_ref()
                    .is_none_or(|(l, inc)| if *inc { v >= l.as_str() } else { v > l.as_str() })
                    && upper
                        .as_ref()
                        .is_none_or(|(u, inc)| if *inc { v <= u.as_str() } else { v < u.as_str() })
            }
        }
    }

    fn canonical(&self) -> String {
        match self {
            Constraint::OneOf(set) => format!("in({})", set.iter().map(|v| escape(v)).collect::<Vec<_>>().join(",")),
            Constraint::Nothing => "none".into(),
            Constraint::Range { lower, upper } => {
                let bound = |b: &Option<(String, bool)>| match b {
                    None => "*".to_owned(),
                    Some((v, inc)) => format!("{}{}", if *inc { "=" } else { "" }, escape(v)),
                };
                format!("range({};{})", bound(lower), bound(upper))
            }
        }
    }
}

/// The stricter of two bounds: `keep` says which way is stricter.
fn tighter(a: Option<(String, bool)>, b: Option<(String, bool)>, keep: std::cmp::Ordering) -> Option<(String, bool)> {
    match (a, b) {
        (None, x) | (x, None) => x,
        (Some(a), Some(b)) => Some(match a.0.cmp(&b.0) {
            std::cmp::Ordering::Equal => (a.0, a.1 && b.1),
            o if o == keep => a,
            _ => b,
        }),
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace(',', "\\,")
        .replace(';', "\\;")
        .replace(')', "\\)")
}

/// A half-open range of time, in whole hours since 1970 (days are 24 of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hours {
    /// First hour included.
    pub start: i64,
    /// First hour not included.
    pub end: i64,
}

impl Hours {
    /// Every hour there is.
    pub const ALL: Hours = Hours {
        start: i64::MIN / 4,
        end: i64::MAX / 4,
    };

    /// The days `from..=to`.
    pub fn days(from: NaiveDate, to: NaiveDate) -> Hours {
        let hour = |d: NaiveDate| d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc().timestamp() / 3600;
        Hours {
            start: hour(from),
            end: hour(to) + 24,
        }
    }

    /// The hours from `start` (inclusive) to `end` (exclusive).
    pub fn between(start: DateTime<Utc>, end: DateTime<Utc>) -> Hours {
        Hours {
            start: start.timestamp().div_euclid(3600),
            end: (end.timestamp() + 3599).div_euclid(3600),
        }
    }

    /// The hours in both.
    pub fn and(self, other: Hours) -> Hours {
        let start = self.start.max(other.start);
        Hours {
            start,
            end: self.end.min(other.end).max(start),
        }
    }

    /// Whether it holds no hour.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Whether it reaches into the last `hours` before `now` (data there may still change).
    pub fn reaches_after(&self, now: DateTime<Utc>, hours: i64) -> bool {
        self.end > now.timestamp().div_euclid(3600) - hours
    }
}

/// The rows a released number sums: a rollup, a constraint per dimension, and a time range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cell {
    table: String,
    dimensions: BTreeMap<String, Constraint>,
    time: Option<Hours>,
}

impl Cell {
    /// Every row of `table`.
    pub fn of(table: &str) -> Self {
        Cell {
            table: table.to_owned(),
            ..Cell::default()
        }
    }

    /// Narrowed to rows whose `dimension` meets `constraint` as well.
    pub fn with(mut self, dimension: &str, constraint: Constraint) -> Self {
        let joined = match self.dimensions.remove(dimension) {
            Some(existing) => existing.and(constraint),
            None => constraint,
        };
        self.dimensions.insert(dimension.to_owned(), joined);
        self
    }

    /// Narrowed to rows whose `dimension` equals `value` as well.
    pub fn with_value(self, dimension: &str, value: Option<&str>) -> Self {
        // a NULL dimension is its own value, distinct from every string
        let value = value.map_or_else(|| "\u{0}NULL".to_owned(), str::to_owned);
        self.with(dimension, Constraint::OneOf(BTreeSet::from([value])))
    }

    /// Narrowed to `hours` as well.
    pub fn within(mut self, hours: Hours) -> Self {
        self.time = Some(self.time.map_or(hours, |t| t.and(hours)));
        self
    }

    /// The time range (all time when unconstrained).
    pub fn hours(&self) -> Hours {
        self.time.unwrap_or(Hours::ALL)
    }

    /// The identity of `measure` over these rows, as the bytes the noise is keyed by.
    pub fn identity(&self, measure: &str) -> Vec<u8> {
        let mut out = format!("v1|{}|{}", self.table, measure);
        for (dimension, constraint) in &self.dimensions {
            out.push('|');
            out.push_str(dimension);
            out.push('=');
            out.push_str(&constraint.canonical());
        }
        if let Some(h) = self.time {
            out.push_str(&format!("|hours=[{},{})", h.start, h.end));
        }
        out.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(v: &str) -> Constraint {
        Constraint::OneOf(BTreeSet::from([v.to_owned()]))
    }

    #[test]
    fn the_same_rows_reached_two_ways_have_one_identity() {
        let nov = Hours::days(
            NaiveDate::from_ymd_opt(2026, 11, 1).unwrap_or_default(),
            NaiveDate::from_ymd_opt(2026, 11, 30).unwrap_or_default(),
        );
        // a row of the geo report, and the total of the report filtered to that country
        let row = Cell::of("traffic_hourly").within(nov).with_value("country", Some("JO"));
        let total = Cell::of("traffic_hourly").with("country", one("JO")).within(nov);
        assert_eq!(row.identity("sum(events)"), total.identity("sum(events)"));
        assert_ne!(row.identity("sum(events)"), row.identity("visitors"));
        // `IN ('JO')` and `= 'JO'` are the same rows; `IN ('JO','SA')` are not
        let listed = Cell::of("traffic_hourly")
            .with("country", Constraint::OneOf(BTreeSet::from(["JO".to_owned()])))
            .within(nov);
        assert_eq!(listed.identity("m"), row.identity("m"));
        let both = Cell::of("traffic_hourly")
            .with(
                "country",
                Constraint::OneOf(BTreeSet::from(["JO".to_owned(), "SA".to_owned()])),
            )
            .within(nov);
        assert_ne!(both.identity("m"), row.identity("m"));
        // narrowing a set by an equality inside it gives the equality
        assert_eq!(both.with("country", one("JO")).identity("m"), row.identity("m"));
        // a day through a month report filtered by date is that day
        let day = NaiveDate::from_ymd_opt(2026, 11, 10).unwrap_or_default();
        assert_eq!(
            Cell::of("t").within(nov).within(Hours::days(day, day)).identity("m"),
            Cell::of("t").within(Hours::days(day, day)).identity("m")
        );
        // a NULL is not the text "NULL"
        assert_ne!(
            Cell::of("t").with_value("region", None).identity("m"),
            Cell::of("t").with_value("region", Some("NULL")).identity("m")
        );
    }

    #[test]
    fn constraints_combine() {
        let a_to_m = Constraint::Range {
            lower: Some(("a".into(), true)),
            upper: Some(("m".into(), false)),
        };
        assert_eq!(a_to_m.clone().and(one("c")), one("c"));
        assert_eq!(a_to_m.and(one("x")), Constraint::Nothing);
        assert_eq!(one("a").and(one("b")), Constraint::Nothing);
    }
}
