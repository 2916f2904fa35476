//! `events` rows as the rollups read them: the columns they aggregate by,
//! whatever string encoding a batch came in, and the visitor sketch they share.

use arrow::array::{Array, BooleanArray, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, TimeUnit};
use arrow::record_batch::RecordBatch;
use datasketches::hll::{HllSketch, HllType};
use marsad_schemas::HLL_LG_K;

use super::clamp::visitor_print;
use crate::{Error, Result};

/// A hash map under a per-process random seed (foldhash), for keys nobody outside chooses:
/// codes the rollups gave out, and prints of keyed pseudonyms.
pub(super) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Dimension values as small codes, so a cell's key is a few integers instead of strings
/// allocated for every row: code 0 is null, code n the nth value seen. The values come from
/// clients (referrer domains, ad ids), so they are hashed with SipHash, as `std` does.
#[derive(Default)]
pub(super) struct Interner {
    codes: std::collections::HashMap<Box<str>, u32>,
    values: Vec<Box<str>>,
}

/// Values an interner keeps before it starts over (a client can send any number of referrer
/// domains; the cells' keys are few): emptied, or rebuilt from the keys still in use.
pub(super) const INTERNED_MAX: usize = 1 << 16;

impl Interner {
    /// The code of `value`, given one if new.
    pub(super) fn code(&mut self, value: Option<&str>) -> u32 {
        let Some(value) = value else {
            return 0;
        };
        if let Some(&code) = self.codes.get(value) {
            return code;
        }
        self.values.push(value.into());
        let code = self.values.len() as u32;
        self.codes.insert(value.into(), code);
        code
    }

    /// The value behind `code`.
    pub(super) fn value(&self, code: u32) -> Option<&str> {
        code.checked_sub(1)
            .and_then(|i| self.values.get(i as usize))
            .map(|v| &**v)
    }

    /// Values known.
    pub(super) fn len(&self) -> usize {
        self.values.len()
    }

    /// Starts over with only the values `keys` still use, recoding them in place.
    pub(super) fn rebuild<'a>(&mut self, keys: impl Iterator<Item = &'a mut [u32]>) {
        let old = std::mem::take(self);
        for key in keys {
            for code in key.iter_mut() {
                *code = self.code(old.value(*code));
            }
        }
    }
}

pub(super) const MICROS_PER_HOUR: i64 = 3_600_000_000;
pub(super) const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

/// Whether the hour starting at `hour` (microseconds) is on a day within `first..=last`
/// (days since 1970): what a rollup keyed by hour keeps for a rebuild of those days.
pub(super) fn hour_within_days(hour: i64, first: i32, last: i32) -> bool {
    (first..=last).contains(&(hour.div_euclid(MICROS_PER_DAY) as i32))
}

/// Hands `follow` the stored rows of `batch` a session replay follows after a restart: people's
/// rows, but those in `skip` (the ones the table is about to count).
pub(super) fn replay_rows(
    batch: &RecordBatch,
    skip: &crate::dedup::IdFingerprints,
    mut follow: impl FnMut(&EventRows, usize),
) -> Result<()> {
    let rows = EventRows::new(batch)?;
    for i in 0..rows.len() {
        if rows.counted(i) && !skip.contains(rows.get(Col::VisitorKey, i), rows.event_id(i)) {
            follow(&rows, i);
        }
    }
    Ok(())
}

/// The columns of `events` the rollups read, in [`Col`] order.
pub(super) const COLUMNS: [&str; 20] = [
    "event_type",
    "visitor_key",
    "session_id",
    "country",
    "region",
    "device_type",
    "os",
    "browser",
    "language",
    "page_category",
    "referrer_domain",
    "campaign_id",
    "ad_id",
    "placement",
    "age_band",
    "gender",
    "page_path",
    "utm_source",
    "utm_medium",
    "utm_campaign",
];

#[derive(Clone, Copy)]
pub(super) enum Col {
    EventType = 0,
    VisitorKey,
    SessionId,
    Country,
    Region,
    DeviceType,
    Os,
    Browser,
    Language,
    PageCategory,
    ReferrerDomain,
    CampaignId,
    AdId,
    Placement,
    AgeBand,
    Gender,
    PagePath,
    UtmSource,
    UtmMedium,
    UtmCampaign,
}

/// A session id as a map key held inline (no allocation, no pointer to follow when maps
/// compare keys): the processor's ids, 24 lowercase hex digits, are kept whole with their
/// length, so two ids have the same print only if they are the same id; any other text is
/// hashed to 120 bits under a marker no such id has.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(super) struct SessionPrint(u128);

/// The longest run of hex digits a print keeps whole (the length goes in the top byte).
const SESSION_HEX_MAX: usize = 30;

pub(super) fn session_print(session: &str) -> SessionPrint {
    let hex = session.len() <= SESSION_HEX_MAX
        && session
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if hex {
        // at most 30 hex digits fit in 120 bits; the empty id is 0 of length 0
        let value = session.bytes().fold(0u128, |v, b| {
            (v << 4) | u128::from((b as char).to_digit(16).unwrap_or(0))
        });
        return SessionPrint(((session.len() as u128) << 120) | value);
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(session.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[0] = 0xFF;
    SessionPrint(u128::from_be_bytes(bytes))
}

/// `events` rows as the rollups read them, whatever string encoding the batch came in.
pub struct EventRows {
    pub(super) ts: TimestampMicrosecondArray,
    strings: Vec<StringArray>,
    is_bot: BooleanArray,
    event_id: StringArray,
    /// Each row's visitor as the clamps key it, computed once for every table.
    visitors: Vec<Option<u64>>,
    /// Each row's session as the session-following tables key it, computed once for all.
    sessions: Vec<Option<SessionPrint>>,
}

fn utf8(batch: &RecordBatch, name: &str) -> Result<StringArray> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| arrow::error::ArrowError::SchemaError(format!("events batch without `{name}`")))?;
    let cast = arrow::compute::cast(col, &DataType::Utf8)?;
    cast.as_any()
        .downcast_ref::<StringArray>()
        .cloned()
        .ok_or_else(|| Error::Arrow(arrow::error::ArrowError::CastError(format!("`{name}` is not text"))))
}

impl EventRows {
    /// Column `name` of `batch` as text, whatever string encoding it came in.
    pub fn text_column(batch: &RecordBatch, name: &str) -> Result<StringArray> {
        utf8(batch, name)
    }

    /// Reads the rollup columns of an `events` batch.
    pub fn new(batch: &RecordBatch) -> Result<Self> {
        let missing = |name: &str| arrow::error::ArrowError::SchemaError(format!("events batch without `{name}`"));
        let ts = batch.column_by_name("ts").ok_or_else(|| missing("ts"))?;
        let ts = arrow::compute::cast(ts, &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())))?;
        let ts = ts
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .cloned()
            .ok_or_else(|| missing("ts"))?;
        let is_bot = batch.column_by_name("is_bot").ok_or_else(|| missing("is_bot"))?;
        let is_bot = is_bot
            .as_any()
            .downcast_ref::<BooleanArray>()
            .cloned()
            .ok_or_else(|| missing("is_bot"))?;
        let strings = COLUMNS.iter().map(|c| utf8(batch, c)).collect::<Result<Vec<_>>>()?;
        let prints = |col: Col| {
            let a = &strings[col as usize];
            move |i: usize| (!a.is_null(i)).then(|| a.value(i))
        };
        let visitor = prints(Col::VisitorKey);
        let session = prints(Col::SessionId);
        Ok(EventRows {
            visitors: (0..ts.len()).map(|i| visitor(i).map(visitor_print)).collect(),
            sessions: (0..ts.len()).map(|i| session(i).map(session_print)).collect(),
            ts,
            strings,
            is_bot,
            event_id: utf8(batch, "event_id")?,
        })
    }

    /// Row `row`'s visitor as a clamp counts it (`None`: no cookie).
    pub(super) fn visitor(&self, row: usize) -> Option<u64> {
        self.visitors[row]
    }

    /// Row `row`'s session as the rollups follow it.
    pub(super) fn session(&self, row: usize) -> Option<SessionPrint> {
        self.sessions[row]
    }

    pub(crate) fn len(&self) -> usize {
        self.ts.len()
    }

    pub(super) fn get(&self, col: Col, row: usize) -> Option<&str> {
        let a = &self.strings[col as usize];
        (!a.is_null(row)).then(|| a.value(row))
    }

    pub(crate) fn counted(&self, row: usize) -> bool {
        !(self.is_bot.is_valid(row) && self.is_bot.value(row))
    }

    pub(crate) fn event_id(&self, row: usize) -> &str {
        self.event_id.value(row)
    }
}

pub(crate) fn new_sketch() -> HllSketch {
    // HLL_LG_K is within the sketch's range, so this cannot fail; fall back to the smallest anyway
    HllSketch::new(HLL_LG_K, HllType::Hll8)
        .or_else(|_| HllSketch::new(4, HllType::Hll8))
        .unwrap_or_else(|_| unreachable!("lg_k 4 is valid"))
}

/// An `events`-shaped batch of (visitor, session, minute, category, type) rows, for the
/// rollups' unit tests.
#[cfg(test)]
pub(crate) fn test_batch(rows: &[(&str, &str, i64, &str, &str)]) -> RecordBatch {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, BooleanBuilder, StringBuilder};
    use marsad_schemas::events_schema;
    let schema = events_schema();
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| -> ArrayRef {
            match f.name().as_str() {
                "ts" => Arc::new(
                    TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.2 * 60_000_000))
                        .with_timezone("UTC"),
                ),
                "date" => Arc::new(arrow::array::Date32Array::from_iter_values(rows.iter().map(|_| 0))),
                "is_bot" | "consent_marketing" => {
                    let mut b = BooleanBuilder::new();
                    rows.iter().for_each(|_| b.append_value(false));
                    Arc::new(b.finish())
                }
                name => {
                    let mut b = StringBuilder::new();
                    for (i, r) in rows.iter().enumerate() {
                        match name {
                            "event_id" => b.append_value(format!("e{i}-{}-{}", r.1, r.2)),
                            "visitor_key" => b.append_value(r.0),
                            "session_id" => b.append_value(r.1),
                            "page_category" => b.append_value(r.3),
                            "page_path" => b.append_value(format!("/{}", r.3)),
                            "event_type" => b.append_value(r.4),
                            "country" => b.append_value("JO"),
                            _ => b.append_null(),
                        }
                    }
                    Arc::new(b.finish())
                }
            }
        })
        .collect();
    RecordBatch::try_new(schema, columns).expect("a valid batch")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_prints_tell_every_id_apart() {
        let ids = [
            "",
            "0",
            "00",
            "a",
            "0a",
            "A",
            "9f86d081884c7d659a2feaa0",
            "9f86d081884c7d659a2feaa1",
            "09f86d081884c7d659a2feaa0",
            "s1",
            "s2",
            "123456789012345678901234567890",
            "1234567890123456789012345678901",
        ];
        let prints: std::collections::HashSet<SessionPrint> = ids.iter().map(|s| session_print(s)).collect();
        assert_eq!(prints.len(), ids.len(), "no two ids share a print");
        assert_eq!(
            session_print("9f86d081884c7d659a2feaa0"),
            session_print("9f86d081884c7d659a2feaa0")
        );
    }
}
