//! From an envelope (IP, cookie, user id, raw URL) to an anonymous event row.

use std::sync::Arc;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use marsad_privacy::consent::{ConsentDefaults, StatedConsent, decide};
use marsad_privacy::geoip::GeoIp;
use marsad_privacy::keys::{DailyKeyStore, SecretKey, SubjectKeys};
use marsad_privacy::optout::{OptOutRecord, OptOutRegistry, Purpose, SubjectOptOuts};
use marsad_privacy::pseudonym::{PreparedKey, Subject};
use marsad_privacy::scrub::{QueryAllowList, referrer_domain, scrub_url};
use marsad_privacy::user_agent::UserAgentCache;
use marsad_schemas::Envelope;

use crate::category::PageCategories;
use crate::sessions::SessionTracker;

/// Client clocks further than this from the receive time are not believed.
const MAX_CLOCK_SKEW_PAST: i64 = 24 * 60;
pub(crate) const MAX_CLOCK_SKEW_FUTURE: i64 = 5;

/// Age bands stored as declared; anything else is dropped (free text could identify).
const AGE_BANDS: &[&str] = &["13-17", "18-24", "25-34", "35-44", "45-54", "55-64", "65+"];
/// Genders stored as declared.
const GENDERS: &[&str] = &["female", "male", "other"];

/// One row of the `events` table: nothing in it is an IP or a raw identifier.
#[derive(Debug, Clone, PartialEq)]
pub struct AnonymousEvent {
    /// Client-made or ingest-made id.
    pub event_id: String,
    /// The contract's event type.
    pub event_type: &'static str,
    /// When it happened (client time if believable, else receive time).
    pub ts: DateTime<Utc>,
    /// The partition.
    pub date: NaiveDate,
    /// Keyed hash of the cookie under the day's key.
    pub visitor_key: Option<String>,
    /// Keyed hash under the targeting key, only with personalisation consent.
    pub audience_id: Option<String>,
    /// 30-minute inactivity session.
    pub session_id: Option<String>,
    /// ISO country.
    pub country: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// City.
    pub city: Option<String>,
    /// desktop / mobile / tablet / bot / other.
    pub device_type: &'static str,
    /// OS.
    pub os: Option<String>,
    /// Browser.
    pub browser: Option<String>,
    /// Browser major version.
    pub browser_version: Option<String>,
    /// Primary language of `Accept-Language`.
    pub language: Option<String>,
    /// Scrubbed path.
    pub page_path: Option<String>,
    /// Category of the path.
    pub page_category: Option<Arc<str>>,
    /// Referrer host.
    pub referrer_domain: Option<String>,
    /// utm_source.
    pub utm_source: Option<String>,
    /// utm_medium.
    pub utm_medium: Option<String>,
    /// utm_campaign.
    pub utm_campaign: Option<String>,
    /// Ad.
    pub ad_id: Option<String>,
    /// Campaign.
    pub campaign_id: Option<String>,
    /// Placement.
    pub placement: Option<String>,
    /// Declared age band (with personalisation consent).
    pub age_band: Option<String>,
    /// Declared gender (with personalisation consent).
    pub gender: Option<String>,
    /// Crawler, bot or headless browser.
    pub is_bot: bool,
    /// Marketing consent.
    pub consent_marketing: bool,
}

/// Days whose key an anonymizer holds ready at most (events arrive up to a day late).
const PREPARED_DAYS: usize = 3;

/// The `audience_id`s of an event's user and cookie, once computed.
#[derive(Default)]
struct Audiences {
    user: Option<String>,
    cookie: Option<String>,
}

/// Turns envelopes into anonymous rows; one per processor worker (it caches).
pub struct Anonymizer {
    geoip: Arc<GeoIp>,
    daily_keys: Arc<dyn DailyKeyStore>,
    /// Recent days' keys made ready, each beside the key it came from (the store's answer is
    /// asked for every event, so a destroyed key is never used; see [`Self::forget_prepared_keys`]).
    prepared_daily: Vec<(NaiveDate, std::sync::Weak<SecretKey>, PreparedKey)>,
    subject_keys: SubjectKeys,
    /// The targeting key made ready once (`audience_id`s).
    targeting: PreparedKey,
    /// The opt-out key made ready once (looking up opt-outs).
    optout_key: PreparedKey,
    allow: QueryAllowList,
    consent_defaults: ConsentDefaults,
    user_agents: UserAgentCache,
    sessions: SessionTracker,
    opt_outs: Arc<OptOutRegistry>,
    /// Opt-outs made for cookies sent with opted-out user ids, not yet handed to the caller.
    linked_opt_outs: Vec<OptOutRecord>,
    truncate_ip: bool,
    categories: PageCategories,
}

/// Why an envelope cannot become a row; the reason goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unprocessable(pub String);

/// Why an envelope did not become a row now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAnonymized {
    /// It never can: the reason goes to the dead-letter topic.
    #[error("{0}")]
    Unprocessable(#[from] Unprocessable),
    /// The daily key store cannot be reached now (a broker outage): try again later, and
    /// never dead-letter the event for it.
    #[error("daily key store unavailable: {0}")]
    KeysUnavailable(String),
}

fn primary_language(header: &str) -> Option<String> {
    let first = header.split(',').next()?.split(';').next()?.trim();
    let primary = first.split(['-', '_']).next()?.to_ascii_lowercase();
    (primary.len() >= 2 && primary.len() <= 3 && primary.bytes().all(|b| b.is_ascii_alphabetic())).then_some(primary)
}

fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    }
}

impl Anonymizer {
    /// Builds one from the shared mechanisms.
    pub fn new(
        geoip: Arc<GeoIp>,
        daily_keys: Arc<dyn DailyKeyStore>,
        subject_keys: SubjectKeys,
        allow: QueryAllowList,
        consent_defaults: ConsentDefaults,
        opt_outs: Arc<OptOutRegistry>,
    ) -> Self {
        Anonymizer {
            opt_outs,
            linked_opt_outs: Vec::new(),
            truncate_ip: false,
            geoip,
            daily_keys,
            prepared_daily: Vec::new(),
            targeting: PreparedKey::new(&subject_keys.targeting),
            optout_key: PreparedKey::new(&subject_keys.optout),
            subject_keys,
            allow,
            consent_defaults,
            user_agents: UserAgentCache::default(),
            sessions: SessionTracker::default(),
            categories: PageCategories::default(),
        }
    }

    /// Categorizes pages by these rules instead of the defaults.
    pub fn with_categories(mut self, categories: PageCategories) -> Self {
        self.categories = categories;
        self
    }

    /// Looks addresses up by their /24 (IPv4) or /48 (IPv6) network only.
    pub fn with_truncated_ips(mut self, truncate: bool) -> Self {
        self.truncate_ip = truncate;
        self
    }

    /// Continues a session stored before a restart.
    pub fn resume_session(&mut self, visitor_key: &str, session_id: &str, last: DateTime<Utc>) {
        self.sessions.resume(visitor_key, session_id, last);
    }

    /// Forgets idle sessions; call now and then.
    pub fn expire_sessions(&mut self, now: DateTime<Utc>) {
        self.sessions.expire(now);
    }

    /// Drops the daily keys made ready: call after the store destroyed keys (the processor's
    /// maintenance does), so a destroyed day's key leaves nothing behind even when no event
    /// arrives (each event drops the ready state of any key the store let go of).
    pub fn forget_prepared_keys(&mut self) {
        self.prepared_daily.clear();
    }

    /// Days whose key is held ready now.
    #[cfg(test)]
    fn prepared_days(&self) -> usize {
        self.prepared_daily.len()
    }

    /// `day`'s key, made ready once while the store keeps answering with the same key.
    fn prepared_daily_key(&mut self, day: NaiveDate, key: &Arc<SecretKey>) -> &PreparedKey {
        // a key the store let go of (destroyed, or replaced) takes its ready state with it
        self.prepared_daily.retain(|(_, k, _)| k.strong_count() > 0);
        let at = self
            .prepared_daily
            .iter()
            .position(|(d, k, _)| *d == day && std::ptr::eq(k.as_ptr(), Arc::as_ptr(key)));
        let at = match at {
            Some(at) => at,
            None => {
                self.prepared_daily.retain(|(d, _, _)| *d != day);
                if self.prepared_daily.len() >= PREPARED_DAYS {
                    self.prepared_daily.remove(0);
                }
                self.prepared_daily
                    .push((day, Arc::downgrade(key), PreparedKey::new(key)));
                self.prepared_daily.len() - 1
            }
        };
        &self.prepared_daily[at].2
    }

    /// The opt-outs recorded for cookies sent with opted-out user ids since the last call, for
    /// the caller to record in the opt-out log (they are in force here already).
    pub fn take_linked_opt_outs(&mut self) -> Vec<OptOutRecord> {
        std::mem::take(&mut self.linked_opt_outs)
    }

    /// The opt-outs of an event's identifiers, each looked up once. A cookie sent with a user id
    /// that opted out takes on the user's opt-outs at once (the person's cookie-only visits are
    /// covered too, before and after login); those are kept for [`Self::take_linked_opt_outs`].
    /// Also the `audience_id`s of the user and the cookie when they were computed for it.
    fn opt_outs_of(&mut self, cookie: Option<&str>, user: Option<&str>) -> (SubjectOptOuts, Audiences) {
        if self.opt_outs.is_empty() {
            return (SubjectOptOuts::default(), Audiences::default());
        }
        let of = |subject| self.opt_outs.of_subject(&self.optout_key, &self.targeting, subject);
        let (of_user, user_audience) = user.map(|u| of(Subject::User(u))).unzip();
        let (of_cookie, cookie_audience) = cookie.map(|c| of(Subject::Cookie(c))).unzip();
        let (of_user, of_cookie) = (of_user.unwrap_or_default(), of_cookie.unwrap_or_default());
        let audiences = Audiences {
            user: user_audience,
            cookie: cookie_audience,
        };
        if let (Some(_), Some(cookie)) = (user, cookie) {
            for scope in of_user.scopes_missing_from(of_cookie) {
                let keys = &self.subject_keys;
                let record = OptOutRecord::new(&keys.optout, &keys.targeting, Subject::Cookie(cookie), scope);
                self.opt_outs.apply(&record);
                self.linked_opt_outs.push(record);
            }
        }
        (of_user.union(of_cookie), audiences)
    }

    /// Anonymizes one envelope; `None` when it must not be stored (analytics refused or opted out).
    /// The envelope's IP and ids are read here and nowhere after.
    pub fn anonymize(&mut self, env: &Envelope) -> Result<Option<AnonymousEvent>, NotAnonymized> {
        let ev = &env.event;
        let event_id = ev
            .event_id
            .clone()
            .ok_or_else(|| Unprocessable("envelope without event_id".into()))?;
        let received = env.received_at;
        let ts = ev
            .ts
            .filter(|t| {
                *t >= received - Duration::minutes(MAX_CLOCK_SKEW_PAST)
                    && *t <= received + Duration::minutes(MAX_CLOCK_SKEW_FUTURE)
            })
            .unwrap_or(received);
        let date = ts.date_naive();
        let c = ev.consent.unwrap_or_default();
        let stated = StatedConsent {
            analytics: c.analytics,
            personalisation: c.personalisation,
            marketing: c.marketing,
        };
        // (before the consent decision: a user id's opt-out reaches its cookie either way)
        let (opt_outs, audiences) = self.opt_outs_of(ev.cookie_id.as_deref(), ev.user_id.as_deref());
        let mut decision = decide(stated, env.dnt, env.gpc, self.consent_defaults);
        if !decision.analytics {
            return Ok(None);
        }
        if opt_outs.covers(Purpose::Analytics) {
            return Ok(None);
        }
        decision.personalisation &= !opt_outs.covers(Purpose::Personalisation);
        decision.marketing &= !opt_outs.covers(Purpose::Marketing);

        let location = env
            .client_ip
            .map(canonical_ip)
            .map(|ip| {
                if self.truncate_ip {
                    marsad_privacy::client_ip::truncate(ip)
                } else {
                    ip
                }
            })
            .map(|ip| self.geoip.lookup(ip))
            .unwrap_or_default();
        let visitor_key = match ev.cookie_id.as_deref() {
            Some(cookie) => match self.daily_keys.key_for(date) {
                Ok(key) => Some(self.prepared_daily_key(date, &key).visitor_key(cookie)),
                Err(marsad_privacy::Error::KeyDestroyed { .. }) => None,
                Err(e) => return Err(NotAnonymized::KeysUnavailable(e.to_string())),
            },
            None => None,
        };
        // a logged-in visitor is targeted as the account, else as the browser
        let audience_id = if decision.personalisation {
            let key_of = |known: Option<String>, s| known.unwrap_or_else(|| self.targeting.audience_id(s));
            ev.user_id
                .as_deref()
                .map(|u| key_of(audiences.user, Subject::User(u)))
                .or_else(|| {
                    ev.cookie_id
                        .as_deref()
                        .map(|c| key_of(audiences.cookie, Subject::Cookie(c)))
                })
        } else {
            None
        };
        let session_id = visitor_key.as_deref().map(|v| self.sessions.session_id(v, ts));
        let device = self.user_agents.parse(env.user_agent.as_deref().unwrap_or(""));
        let page = ev.url.as_deref().map(|u| scrub_url(u, &self.allow));
        let category = page.as_ref().map(|p| self.categories.categorize(&p.page_path));
        let ad = ev.ad.clone().unwrap_or_default();
        let demo = if decision.personalisation {
            ev.demographics.clone().unwrap_or_default()
        } else {
            Default::default()
        };
        let (page_path, utm_source, utm_medium, utm_campaign) = match page {
            Some(p) => (Some(p.page_path), p.utm_source, p.utm_medium, p.utm_campaign),
            None => (None, None, None, None),
        };
        Ok(Some(AnonymousEvent {
            event_id,
            event_type: ev.event_type.as_str(),
            ts,
            date,
            visitor_key,
            audience_id,
            session_id,
            country: location.country,
            region: location.region,
            city: location.city,
            device_type: device.device_type,
            os: device.os.clone(),
            browser: device.browser.clone(),
            browser_version: device.browser_version.clone(),
            language: env.accept_language.as_deref().and_then(primary_language),
            page_path,
            page_category: category,
            referrer_domain: ev.referrer.as_deref().and_then(referrer_domain),
            utm_source,
            utm_medium,
            utm_campaign,
            ad_id: ad.ad_id,
            campaign_id: ad.campaign_id,
            placement: ad.placement,
            age_band: demo.age_band.filter(|a| AGE_BANDS.contains(&a.as_str())),
            gender: demo
                .gender
                .map(|g| g.to_ascii_lowercase())
                .filter(|g| GENDERS.contains(&g.as_str())),
            is_bot: device.is_bot,
            consent_marketing: decision.marketing,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use marsad_privacy::keys::LocalDailyKeyStore;
    use marsad_schemas::ENVELOPE_VERSION;

    fn anonymizer(dir: &std::path::Path) -> Anonymizer {
        let keys = LocalDailyKeyStore::open(dir, Duration::hours(48)).expect("key store");
        Anonymizer::new(
            Arc::new(GeoIp::bundled().expect("geoip")),
            Arc::new(keys),
            SubjectKeys::from_seed(7),
            QueryAllowList::new(&["utm_*".into()]),
            ConsentDefaults::default(),
            Arc::new(OptOutRegistry::default()),
        )
    }

    fn envelope(json: &str, gpc: bool) -> Envelope {
        Envelope {
            v: ENVELOPE_VERSION,
            event: serde_json::from_str(json).expect("event"),
            received_at: Utc::now(),
            client_ip: Some("176.29.10.1".parse().expect("ip")),
            user_agent: Some("Mozilla/5.0 (Linux; Android 13; SM-A536B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36".into()),
            accept_language: Some("ar-JO,ar;q=0.9,en;q=0.8".into()),
            dnt: false,
            gpc,
        }
    }

    #[test]
    fn rows_carry_no_identifiers() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut a = anonymizer(dir.path());
        let env = envelope(
            r#"{"type":"page_view","event_id":"e1","url":"https://kulshi.example/ar/cars/toyota?id=7&utm_source=fb","cookie_id":"c-secret","user_id":"u-secret",
               "referrer":"https://www.google.com/search?q=x","consent":{"personalisation":true},"demographics":{"age_band":"25-34","gender":"Female"}}"#,
            false,
        );
        let row = a.anonymize(&env).expect("row").expect("stored");
        assert_eq!(row.country.as_deref(), Some("JO"));
        assert_eq!(row.page_path.as_deref(), Some("/ar/cars/toyota"));
        assert_eq!(row.page_category.as_deref(), Some("cars"));
        assert_eq!(row.utm_source.as_deref(), Some("fb"));
        assert_eq!(row.referrer_domain.as_deref(), Some("google.com"));
        assert_eq!(row.language.as_deref(), Some("ar"));
        assert_eq!(row.device_type, "mobile");
        assert_eq!(row.gender.as_deref(), Some("female"));
        let text = format!("{row:?}");
        for secret in ["c-secret", "u-secret", "176.29.10.1"] {
            assert!(!text.contains(secret), "{secret} leaked into {text}");
        }
        assert!(row.audience_id.is_some() && row.visitor_key.is_some());
    }

    /// A day's key made ready is used only while the store answers with that very key, and
    /// is dropped by the maintenance: after the store destroys a key, its visitors are never
    /// hashed with it again (here the store makes the day a fresh key, so the pseudonym changes).
    #[test]
    fn a_destroyed_days_key_is_never_used_again_from_its_ready_state() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Arc::new(LocalDailyKeyStore::open(dir.path(), Duration::hours(48)).expect("key store"));
        let mut a = Anonymizer::new(
            Arc::new(GeoIp::bundled().expect("geoip")),
            store.clone(),
            SubjectKeys::from_seed(7),
            QueryAllowList::new(&[]),
            ConsentDefaults::default(),
            Arc::new(OptOutRegistry::default()),
        );
        let env = envelope(r#"{"type":"search","event_id":"e1","cookie_id":"c1"}"#, false);
        let first = a.anonymize(&env).expect("row").expect("stored").visitor_key;
        assert_eq!(a.anonymize(&env).expect("row").expect("stored").visitor_key, first);
        assert_eq!(a.prepared_days(), 1);
        let destroyed = store
            .destroy_expired(Utc::now() + Duration::days(5), Duration::hours(48))
            .expect("destroy");
        assert_eq!(destroyed, vec![env.received_at.date_naive()]);
        // before the maintenance runs: the store's answer is a new key, not the ready one
        let second = a.anonymize(&env).expect("row").expect("stored").visitor_key;
        assert!(second.is_some() && second != first, "hashed with the destroyed key");
        a.forget_prepared_keys();
        assert_eq!(a.prepared_days(), 0);
    }

    #[test]
    fn truncated_addresses_still_locate() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut a = anonymizer(dir.path()).with_truncated_ips(true);
        let env = envelope(r#"{"type":"search","event_id":"e1","cookie_id":"c1"}"#, false);
        let row = a.anonymize(&env).expect("row").expect("stored");
        assert_eq!(row.country.as_deref(), Some("JO"));
    }

    #[test]
    fn gpc_means_no_audience_id_and_no_demographics() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut a = anonymizer(dir.path());
        let env = envelope(
            r#"{"type":"page_view","event_id":"e1","url":"https://kulshi.example/","cookie_id":"c1","consent":{"personalisation":true},"demographics":{"age_band":"25-34"}}"#,
            true,
        );
        let row = a.anonymize(&env).expect("row").expect("stored");
        assert_eq!(row.audience_id, None);
        assert_eq!(row.age_band, None);
        assert!(row.visitor_key.is_some());
    }
}
