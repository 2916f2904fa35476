//! End-to-end tests of the `marsad` binary: real processes on free ports and
//! temporary data dirs, real HTTP, real Delta tables read back over SQL.

/// Shared helpers: starting `marsad up`, SQL, fixture GeoIP database, Parquet scans.
mod common;

/// 20,000 events through every ingest path land once each, with the right geography.
mod e2e;

/// `kill -9` while traffic flows: nothing acknowledged is lost, nothing duplicated.
mod crash;

/// Bad requests get clear 4xx answers and the server keeps serving.
mod bad_input;

/// Personal data never reaches a table; opt-outs and erasure work end to end.
mod privacy;

/// The tracker snippet in a real headless Chromium.
mod browser;

/// The marketing dashboard in a real headless Chromium: sign-in, charts, date range, language, CSV.
mod dashboard;

/// Safe on the open internet: TLS, refusals off loopback, query floods, CSV formulas.
mod security;

/// The Postgres wire protocol with the real `psql`: tables, GROUP BY, refusals, TLS.
mod pg;

/// The Python clients BI tools are built on (SQLAlchemy, pandas, asyncpg, Superset) over TLS.
mod clients;

/// The event log on Kafka: processors in a consumer group, exactly once across a kill, outages.
mod kafka;

/// Rollup totals equal `events` totals, also after crashes between the commits.
mod rollups;

/// Segments hold exactly the expected visitors; opt-outs count at once in the audience API.
mod audience;

/// Segment changes and opt-outs pushed to the ad system through a signed HTTPS webhook.
mod segment_push;

/// `marsad sql`, `marsad compact` and `marsad retention` on a real data dir.
mod batch;

/// Every query is limited in time, memory and rows, with a clear error.
mod reports;

/// Scheduled e-mail reports delivered over STARTTLS to a local SMTP server, parsed.
mod email;
/// The live view: events sent now appear within seconds, events over half an hour old never.
mod live;
/// Sources, pages, goals, funnels and comparisons on a generated fortnight with known answers.
mod marketing;

/// Released numbers: consistent by any path and key, useful, budgeted; advertisers see their campaigns only.
mod release;

/// Python's `deltalake` and `duckdb` read Marsad's tables and count what `/v1/sql` counts.
mod interop;

/// The OpenAPI documents match the routes actually served.
mod openapi;

/// Promises over time: retention on a quiet site, keys destroyed while idle, opt-outs across a
/// key rotation, a user id's erasure taking its cookie.
mod over_time;

/// Tables on object storage (an S3 server): written, read, audited and erased there.
mod object_storage;

/// The binary's allocator returns freed memory: jemalloc's background threads, a 1 s decay.
mod allocator;
