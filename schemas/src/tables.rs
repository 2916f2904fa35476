//! Table and topic names, and the Arrow schema of the `events` table.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// The raw event topic (Kafka) or local log directory.
pub const TOPIC_RAW: &str = "marsad.events.raw";
/// Events the processor could not handle, with the reason.
pub const TOPIC_DEAD: &str = "marsad.events.dead";
/// Opt-out records (compacted on Kafka).
pub const TOPIC_OPTOUTS: &str = "marsad.optouts";
/// Daily visitor keys when the log is Kafka (compacted; tombstoned past their grace period).
pub const TOPIC_DAILY_KEYS: &str = "marsad.keys.daily";

/// The Delta `txn` app id under which a table records the last offset of a topic-partition it
/// holds: the processor resumes after it, and an erasure waits for it to pass the opt-out.
pub fn log_position_app_id(topic: &str, partition: u32) -> String {
    format!("marsad-{topic}-{partition}")
}

/// The tables under `<data_dir>/tables/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableName {
    /// One row per anonymized event.
    Events,
    /// Hourly traffic rollup.
    TrafficHourly,
    /// Hourly ad performance rollup.
    AdPerformanceHourly,
    /// Daily declared-demographics rollup.
    DemographicsDaily,
    /// Hourly sessions by where they came from (channel, referrer, UTM tags).
    SourcesHourly,
    /// Hourly page views, entries and exits by page.
    PagesHourly,
    /// Hourly conversions of the configured goals.
    GoalsHourly,
    /// Hourly sessions reaching each step of the configured funnels.
    FunnelsHourly,
    /// Materialized audience segments.
    SegmentMembers,
}

impl TableName {
    /// Every table in the order the processor commits them, each before the tables made
    /// from it (the query catalog relies on it; `rollup_specs` commits in this order).
    pub const ALL: [TableName; 9] = [
        TableName::Events,
        TableName::TrafficHourly,
        TableName::AdPerformanceHourly,
        TableName::DemographicsDaily,
        TableName::SourcesHourly,
        TableName::PagesHourly,
        TableName::GoalsHourly,
        TableName::FunnelsHourly,
        TableName::SegmentMembers,
    ];

    /// The aggregate tables: every row counts visitors in a sketch, none is one person's event.
    pub const ROLLUPS: [TableName; 7] = [
        TableName::TrafficHourly,
        TableName::AdPerformanceHourly,
        TableName::DemographicsDaily,
        TableName::SourcesHourly,
        TableName::PagesHourly,
        TableName::GoalsHourly,
        TableName::FunnelsHourly,
    ];

    /// The names of [`TableName::ROLLUPS`]: the tables analysts may read.
    pub const ROLLUP_NAMES: [&'static str; 7] = [
        TableName::TrafficHourly.as_str(),
        TableName::AdPerformanceHourly.as_str(),
        TableName::DemographicsDaily.as_str(),
        TableName::SourcesHourly.as_str(),
        TableName::PagesHourly.as_str(),
        TableName::GoalsHourly.as_str(),
        TableName::FunnelsHourly.as_str(),
    ];

    /// The Arrow schema of the table.
    pub fn schema(self) -> SchemaRef {
        match self {
            TableName::Events => events_schema(),
            TableName::TrafficHourly => traffic_hourly_schema(),
            TableName::AdPerformanceHourly => ad_performance_hourly_schema(),
            TableName::DemographicsDaily => demographics_daily_schema(),
            TableName::SourcesHourly => sources_hourly_schema(),
            TableName::PagesHourly => pages_hourly_schema(),
            TableName::GoalsHourly => goals_hourly_schema(),
            TableName::FunnelsHourly => funnels_hourly_schema(),
            TableName::SegmentMembers => segment_members_schema(),
        }
    }

    /// The name used as directory and SQL table name.
    pub const fn as_str(self) -> &'static str {
        match self {
            TableName::Events => "events",
            TableName::TrafficHourly => "traffic_hourly",
            TableName::AdPerformanceHourly => "ad_performance_hourly",
            TableName::DemographicsDaily => "demographics_daily",
            TableName::SourcesHourly => "sources_hourly",
            TableName::PagesHourly => "pages_hourly",
            TableName::GoalsHourly => "goals_hourly",
            TableName::FunnelsHourly => "funnels_hourly",
            TableName::SegmentMembers => "segment_members",
        }
    }
}

/// The partition column of every table.
pub const DATE_COLUMN: &str = "date";

fn utf8(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

/// The Arrow schema of the `events` table: anonymous by construction, no column can hold an IP or a raw id.
pub fn events_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        utf8("event_id", false),
        utf8("event_type", false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new(DATE_COLUMN, DataType::Date32, false),
        utf8("visitor_key", true),
        utf8("audience_id", true),
        utf8("session_id", true),
        utf8("country", true),
        utf8("region", true),
        utf8("city", true),
        utf8("device_type", true),
        utf8("os", true),
        utf8("browser", true),
        utf8("browser_version", true),
        utf8("language", true),
        utf8("page_path", true),
        utf8("page_category", true),
        utf8("referrer_domain", true),
        utf8("utm_source", true),
        utf8("utm_medium", true),
        utf8("utm_campaign", true),
        utf8("ad_id", true),
        utf8("campaign_id", true),
        utf8("placement", true),
        utf8("age_band", true),
        utf8("gender", true),
        Field::new("is_bot", DataType::Boolean, false),
        Field::new("consent_marketing", DataType::Boolean, false),
    ]))
}

fn hour_field() -> Field {
    Field::new(
        "hour",
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        false,
    )
}

fn count(name: &str) -> Field {
    Field::new(name, DataType::Int64, false)
}

/// The HLL sketch columns hold Apache DataSketches HLL sketches of `visitor_key`s with this `lg_k`.
pub const HLL_LG_K: u8 = 12;

/// `traffic_hourly`: partial aggregates per hour and dimensions; rows with the same key add up
/// (`SUM` the counts, `hll_merge` the sketches), so each commit only appends.
pub fn traffic_hourly_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        hour_field(),
        Field::new(DATE_COLUMN, DataType::Date32, false),
        utf8("country", true),
        utf8("region", true),
        utf8("device_type", true),
        utf8("os", true),
        utf8("browser", true),
        utf8("language", true),
        utf8("page_category", true),
        utf8("referrer_domain", true),
        utf8("event_type", false),
        count("events"),
        count("sessions"),
        count("bounces"),
        count("session_seconds"),
        Field::new("visitors", DataType::Binary, false),
    ]))
}

/// `ad_performance_hourly`: impressions, clicks and a visitor sketch per hour, campaign, ad,
/// placement, country and device.
pub fn ad_performance_hourly_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        hour_field(),
        Field::new(DATE_COLUMN, DataType::Date32, false),
        utf8("campaign_id", true),
        utf8("ad_id", true),
        utf8("placement", true),
        utf8("country", true),
        utf8("device_type", true),
        count("impressions"),
        count("clicks"),
        Field::new("visitors", DataType::Binary, false),
    ]))
}

/// `demographics_daily`: events and a visitor sketch per day, place, declared age band and
/// gender, and page category.
pub fn demographics_daily_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(DATE_COLUMN, DataType::Date32, false),
        utf8("country", true),
        utf8("region", true),
        utf8("age_band", true),
        utf8("gender", true),
        utf8("page_category", true),
        count("events"),
        Field::new("visitors", DataType::Binary, false),
    ]))
}

/// `sources_hourly`: sessions by where they came from, each counted in the hour and source of
/// its landing event (its first); its later events, page views, duration and bounce are added
/// to that cell as they arrive. `channel` is never null (`direct` when nothing says otherwise).
pub fn sources_hourly_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        hour_field(),
        Field::new(DATE_COLUMN, DataType::Date32, false),
        utf8("channel", false),
        utf8("referrer_domain", true),
        utf8("utm_source", true),
        utf8("utm_medium", true),
        utf8("utm_campaign", true),
        utf8("country", true),
        utf8("device_type", true),
        count("sessions"),
        count("bounces"),
        count("events"),
        count("page_views"),
        count("session_seconds"),
        Field::new("visitors", DataType::Binary, false),
    ]))
}

/// `pages_hourly`: page views by page path (already scrubbed of personal data) and hour;
/// `entries` counts sessions that began on the page, `exits` sessions whose last page view
/// (so far) it is: a later page view of the session moves its exit (-1 here, +1 there).
pub fn pages_hourly_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        hour_field(),
        Field::new(DATE_COLUMN, DataType::Date32, false),
        utf8("page_path", true),
        utf8("page_category", true),
        utf8("country", true),
        utf8("device_type", true),
        count("page_views"),
        count("entries"),
        count("exits"),
        Field::new("visitors", DataType::Binary, false),
    ]))
}

/// `goals_hourly`: per hour, goal (`[[process.goals]]`), country and device, the events that
/// matched the goal (`conversions`) and a sketch of the visitors who converted.
pub fn goals_hourly_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        hour_field(),
        Field::new(DATE_COLUMN, DataType::Date32, false),
        utf8("goal_id", false),
        utf8("country", true),
        utf8("device_type", true),
        count("conversions"),
        Field::new("visitors", DataType::Binary, false),
    ]))
}

/// `funnels_hourly`: per hour of a session's first event, funnel (`[[process.funnels]]`), step
/// (`1`, `2`, …) and the session's country and device, the sessions that reached the step in
/// order, and a sketch of their visitors.
pub fn funnels_hourly_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        hour_field(),
        Field::new(DATE_COLUMN, DataType::Date32, false),
        utf8("funnel_id", false),
        utf8("step", false),
        utf8("country", true),
        utf8("device_type", true),
        count("sessions"),
        Field::new("visitors", DataType::Binary, false),
    ]))
}

/// `segment_members`: which `audience_id`s each served segment holds, as of its last refresh.
pub fn segment_members_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        utf8("segment_id", false),
        utf8("audience_id", false),
        Field::new(
            "refreshed_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        // every event of the member in the segment's window had marketing consent: only then
        // may the member leave in a marketing export
        Field::new("marketing_consent", DataType::Boolean, false),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_has_the_design_columns() {
        let schema = events_schema();
        for name in [
            "event_id",
            "event_type",
            "ts",
            "date",
            "visitor_key",
            "audience_id",
            "session_id",
            "country",
            "region",
            "city",
            "device_type",
            "os",
            "browser",
            "browser_version",
            "language",
            "page_path",
            "page_category",
            "referrer_domain",
            "utm_source",
            "utm_medium",
            "utm_campaign",
            "ad_id",
            "campaign_id",
            "placement",
            "age_band",
            "gender",
            "is_bot",
        ] {
            assert!(schema.field_with_name(name).is_ok(), "missing column {name}");
        }
    }
}
