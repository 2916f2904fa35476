//! Anonymous rows into Arrow batches of the `events` schema.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanBuilder, Date32Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow::record_batch::RecordBatch;
use chrono::NaiveDate;
use marsad_schemas::events_schema;

use crate::anonymize::AnonymousEvent;

const STRING_COLUMNS: usize = 24;

/// Accumulates rows column by column.
pub struct EventsBatchBuilder {
    event_id: StringBuilder,
    event_type: StringBuilder,
    ts: TimestampMicrosecondBuilder,
    date: Date32Builder,
    strings: Vec<StringBuilder>,
    is_bot: BooleanBuilder,
    consent_marketing: BooleanBuilder,
    rows: usize,
}

impl Default for EventsBatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

pub(crate) fn days_since_epoch(d: NaiveDate) -> i32 {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    (d - epoch).num_days() as i32
}

impl EventsBatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        EventsBatchBuilder {
            event_id: StringBuilder::new(),
            event_type: StringBuilder::new(),
            ts: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            date: Date32Builder::new(),
            strings: (0..STRING_COLUMNS - 2).map(|_| StringBuilder::new()).collect(),
            is_bot: BooleanBuilder::new(),
            consent_marketing: BooleanBuilder::new(),
            rows: 0,
        }
    }

    /// Rows added since the last [`finish`](Self::finish).
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether no row is buffered.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Adds a row.
    pub fn push(&mut self, e: &AnonymousEvent) {
        self.event_id.append_value(&e.event_id);
        self.event_type.append_value(e.event_type);
        self.ts.append_value(e.ts.timestamp_micros());
        self.date.append_value(days_since_epoch(e.date));
        let values: [Option<&str>; STRING_COLUMNS - 2] = [
            e.visitor_key.as_deref(),
            e.audience_id.as_deref(),
            e.session_id.as_deref(),
            e.country.as_deref(),
            e.region.as_deref(),
            e.city.as_deref(),
            Some(e.device_type),
            e.os.as_deref(),
            e.browser.as_deref(),
            e.browser_version.as_deref(),
            e.language.as_deref(),
            e.page_path.as_deref(),
            e.page_category.as_deref(),
            e.referrer_domain.as_deref(),
            e.utm_source.as_deref(),
            e.utm_medium.as_deref(),
            e.utm_campaign.as_deref(),
            e.ad_id.as_deref(),
            e.campaign_id.as_deref(),
            e.placement.as_deref(),
            e.age_band.as_deref(),
            e.gender.as_deref(),
        ];
        for (b, v) in self.strings.iter_mut().zip(values) {
            b.append_option(v);
        }
        self.is_bot.append_value(e.is_bot);
        self.consent_marketing.append_value(e.consent_marketing);
        self.rows += 1;
    }

    /// The buffered rows as a batch; the builder is empty after.
    pub fn finish(&mut self) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.event_id.finish()),
            Arc::new(self.event_type.finish()),
            Arc::new(self.ts.finish()),
            Arc::new(self.date.finish()),
        ];
        columns.extend(self.strings.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.push(Arc::new(self.is_bot.finish()));
        columns.push(Arc::new(self.consent_marketing.finish()));
        self.rows = 0;
        RecordBatch::try_new(events_schema(), columns)
    }
}
