//! Marsad's administrative procedures: the ones that read or rewrite across
//! every table and log, called by the `marsad` CLI and by the query service's
//! admin routes.
//!
//! [`erasure`] records a subject's opt-out, then deletes every row linkable to
//! it from every table and vacuums the rewritten files; [`audit`] scans every
//! table file for personal data and for the raw identifiers the raw log still
//! holds. This crate owns no table and serves nothing: it must not decide who
//! may call it (the callers check the admin role) and never copies personal
//! data out of what it scans (findings are redacted).

#![deny(missing_docs)]

pub mod audit;
pub mod erasure;
