//! Marsad's contracts: the event a client sends, the envelope the ingest stage
//! appends to the event log, and the Arrow schema and names of the tables.
//!
//! This crate owns shapes only. It must not do I/O, hold keys or know how a
//! field is anonymized: the other crates agree through these types.

#![deny(missing_docs)]

pub mod envelope;
pub mod event;
pub mod live;
pub mod tables;

pub use envelope::{DecodeError, ENVELOPE_VERSION, Envelope};
pub use event::{AdRef, Consent, Demographics, Event, EventType, ValidationError};
pub use live::{LiveCell, LivePage, LiveSource};
pub use tables::{
    DATE_COLUMN, HLL_LG_K, TOPIC_DAILY_KEYS, TOPIC_DEAD, TOPIC_OPTOUTS, TOPIC_RAW, TableName,
    ad_performance_hourly_schema, demographics_daily_schema, events_schema, funnels_hourly_schema, goals_hourly_schema,
    log_position_app_id, pages_hourly_schema, segment_members_schema, sources_hourly_schema, traffic_hourly_schema,
};
