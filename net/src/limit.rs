//! Per-client rate limits and request deadlines, as axum middleware.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// Clients remembered before the idle ones are forgotten: bounds the limiter's memory
/// whatever number of addresses a flood comes from.
const FORGET_ABOVE: usize = 100_000;

/// The address an allowance belongs to: an IPv6 client owns its whole /64 (one subscriber's
/// network), so rotating addresses inside it does not buy a fresh allowance.
pub fn allowance_of(client: IpAddr) -> IpAddr {
    match client {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::V6(std::net::Ipv6Addr::from(s))
            }
        },
        v4 => v4,
    }
}

/// Who a request is from, as the caller decides (peer address, or the client behind trusted proxies).
pub type ClientOf = Arc<dyn Fn(&Request) -> IpAddr + Send + Sync>;

/// A request rate per client address: a sustained rate and a burst above it.
pub struct RateLimit {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    client_of: ClientOf,
    checks: AtomicU64,
    what: &'static str,
}

impl RateLimit {
    /// `per_second` sustained with `burst` at once, per address; `None` when `per_second` is 0
    /// (no limit). `what` names the limited calls in the 429's message.
    pub fn new(per_second: u32, burst: u32, what: &'static str, client_of: ClientOf) -> Option<Arc<Self>> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        Some(Self::with_quota(
            Quota::per_second(rate).allow_burst(burst),
            what,
            client_of,
        ))
    }

    /// `per_minute` (at least 1) with as many at once, per address.
    pub fn per_minute(per_minute: u32, what: &'static str, client_of: ClientOf) -> Arc<Self> {
        let rate = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        Self::with_quota(Quota::per_minute(rate), what, client_of)
    }

    fn with_quota(quota: Quota, what: &'static str, client_of: ClientOf) -> Arc<Self> {
        Arc::new(RateLimit {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            client_of,
            checks: AtomicU64::new(0),
            what,
        })
    }

    /// Takes one request of `client` from its allowance, or says how long to wait.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        let client = allowance_of(client);
        if self.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 && self.limiter.len() > FORGET_ABOVE {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter
            .check_key(&client)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// Answers 429 with `Retry-After` to a client past its rate; passes the others on.
pub async fn enforce_rate_limit(State(limit): State<Arc<RateLimit>>, request: Request, next: Next) -> Response {
    let client = (limit.client_of)(&request);
    match limit.check(client) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let secs = secs.max(1);
            let body = format!(
                "{{\"error\":\"too many {} from this address; retry in {secs} s\"}}",
                limit.what
            );
            let mut resp = (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            // a client past its rate does not also keep a connection slot
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
    }
}

/// Answers 408 to a request (body read included) that takes longer than the deadline.
pub async fn enforce_request_timeout(State(deadline): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(deadline, next.run(request)).await {
        Ok(resp) => resp,
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            [
                (header::CONNECTION, "close"),
                (header::CONTENT_TYPE, "application/json"),
            ],
            "{\"error\":\"the request took too long; send it again, faster or smaller\"}",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_second: u32, burst: u32) -> Arc<RateLimit> {
        RateLimit::new(
            per_second,
            burst,
            "requests",
            Arc::new(|_: &Request| IpAddr::from([0, 0, 0, 0])),
        )
        .unwrap_or_else(|| RateLimit::per_minute(1, "requests", Arc::new(|_: &Request| IpAddr::from([0, 0, 0, 0]))))
    }

    #[test]
    fn rotating_ipv6_addresses_within_a_64_shares_one_allowance() {
        let l = limit(1, 3);
        let base: std::net::Ipv6Addr = "2001:db8:1:2::1".parse().unwrap_or(std::net::Ipv6Addr::LOCALHOST);
        let mut refused = 0;
        for i in 0..10u16 {
            let mut s = base.segments();
            s[7] = i;
            s[6] = i.wrapping_mul(7);
            if l.check(IpAddr::V6(std::net::Ipv6Addr::from(s))).is_err() {
                refused += 1;
            }
        }
        assert!(refused >= 6, "only the burst passes: {refused} refused");
        // another /64 has its own allowance
        assert!(
            l.check("2001:db8:1:3::1".parse().unwrap_or(IpAddr::from([1, 1, 1, 1])))
                .is_ok()
        );
    }

    #[test]
    fn ipv4_mapped_addresses_are_their_ipv4() {
        let mapped: IpAddr = "::ffff:203.0.113.9".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert_eq!(allowance_of(mapped), IpAddr::from([203, 0, 113, 9]));
    }
}
