//! Marsad's contracts: the event a client sends, the envelope the ingest stage
//! appends to the event log, and the Arrow schema and names of the tables.
//!
//! This crate owns shapes only. It must not do I/O, hold keys or know how a
//! field is anonymized: the other crates agree through these types.

#![deny(missing_docs)]

pub mod envelope;
pub mod event;
pub mod tables;

pub use envelope::{DecodeError, ENVELOPE_VERSION, Envelope};
pub use event::{AdRef, Consent, Demographics, Event, EventType, ValidationError};
pub use tables::{DATE_COLUMN, TOPIC_DEAD, TOPIC_OPTOUTS, TOPIC_RAW, TableName, events_schema};
