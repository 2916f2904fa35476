//! The live view's contract: what the processor's in-memory window of the last
//! half hour hands the query service, which releases it (noise, threshold,
//! budget) like every other number. Cells are counted by the time the
//! processor counted their events, so a cell that has ended never changes:
//! its released number is the same however often it is asked.

use std::sync::Arc;

/// How far back the live view looks.
pub const LIVE_WINDOW_MINUTES: i64 = 30;
/// The newest cells' length: an event appears at most this long after it is processed.
pub const LIVE_SLOT_SECONDS: i64 = 2;
/// Visits of one visitor a day the live view counts (a visitor counts again 30 minutes after
/// it was last counted): what one visitor-day can add to the live visitors, summed over a day.
pub const LIVE_VISITS_PER_VISITOR_DAY: u64 = 4;

/// One ended stretch of processing time and what was counted in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveCell {
    /// When it starts (seconds since 1970, UTC).
    pub start: i64,
    /// How long it is: a whole minute, or a [`LIVE_SLOT_SECONDS`] slot of the current minute.
    pub seconds: i64,
    /// Visitors who arrived (were counted) in it.
    pub visitors: u64,
    /// Page views.
    pub page_views: u64,
    /// Per page (the path, scrubbed of personal data by the processor).
    pub pages: Vec<LivePage>,
}

/// A page in one live cell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LivePage {
    /// The scrubbed path.
    pub path: Arc<str>,
    /// Its views in the cell.
    pub page_views: u64,
    /// Visitors counted on it in the cell (once per 30 minutes each).
    pub visitors: u64,
}

/// Where the query service reads the live window from (the processor running beside it).
pub trait LiveSource: Send + Sync {
    /// Every ended cell of the last [`LIVE_WINDOW_MINUTES`] at `now` (seconds since 1970),
    /// counted or not: the ended minutes before the current one, then the ended slots of the
    /// current minute. The same cells for any `now` in the same slot, whatever was counted,
    /// so which cells exist tells nothing. Once asked for, a cell is never added to.
    fn cells(&self, now: i64) -> Vec<LiveCell>;
    /// Names this window among others (another processor's, or this one's before a restart):
    /// its cells are its own questions, with their own noise and their own price.
    fn instance(&self) -> &str;
}
