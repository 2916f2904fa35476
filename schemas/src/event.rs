//! The event a browser, app or server sends to `POST /v1/events`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Longest URL or referrer accepted, so one event cannot carry a document.
pub const MAX_URL_LEN: usize = 8 * 1024;
/// Longest identifier (cookie, user, event, ad) accepted.
pub const MAX_ID_LEN: usize = 256;
/// Longest identity token accepted.
pub const MAX_IDENTITY_LEN: usize = 2048;
/// Most entries accepted in `props`.
pub const MAX_PROPS: usize = 64;

/// What happened; the contract's closed list, so typos are refused rather than stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// A page was shown.
    PageView,
    /// An ad was shown.
    AdImpression,
    /// An ad was clicked.
    AdClick,
    /// A search was run on the site.
    Search,
    /// A classified ad was posted.
    AdPost,
    /// An account was created.
    Signup,
    /// Anything else the site wants to count.
    Custom,
}

impl EventType {
    /// The name stored in the `event_type` column, the same as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::PageView => "page_view",
            EventType::AdImpression => "ad_impression",
            EventType::AdClick => "ad_click",
            EventType::Search => "search",
            EventType::AdPost => "ad_post",
            EventType::Signup => "signup",
            EventType::Custom => "custom",
        }
    }

    /// Parses the wire name, for the pixel's `t=` parameter.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "page_view" => EventType::PageView,
            "ad_impression" => EventType::AdImpression,
            "ad_click" => EventType::AdClick,
            "search" => EventType::Search,
            "ad_post" => EventType::AdPost,
            "signup" => EventType::Signup,
            "custom" => EventType::Custom,
            _ => return None,
        })
    }
}

/// The ad an impression or click is about.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdRef {
    /// The ad shown or clicked.
    pub ad_id: Option<String>,
    /// The campaign the ad belongs to.
    pub campaign_id: Option<String>,
    /// Where on the page the ad was shown.
    pub placement: Option<String>,
}

/// The visitor's choices per purpose; `None` means "not stated", resolved by config defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consent {
    /// Counting visits at all.
    pub analytics: Option<bool>,
    /// Personalised ads and content (an `audience_id`, segments).
    pub personalisation: Option<bool>,
    /// Marketing exports and email audiences.
    pub marketing: Option<bool>,
}

/// Demographics the visitor declared on their account; stored only with consent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Demographics {
    /// An age band such as `25-34`.
    pub age_band: Option<String>,
    /// As declared.
    pub gender: Option<String>,
}

/// One event as a client sends it (the design's contract).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// What happened.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// The page, as the browser saw it (scrubbed before storage).
    #[serde(default)]
    pub url: Option<String>,
    /// Where the visitor came from (reduced to a domain before storage).
    #[serde(default)]
    pub referrer: Option<String>,
    /// The first-party cookie `_mid`; never stored in a table.
    #[serde(default)]
    pub cookie_id: Option<String>,
    /// The account id of a logged-in visitor; counts only when `identity` vouches for it;
    /// never stored in a table.
    #[serde(default)]
    pub user_id: Option<String>,
    /// A token the site's backend signed for the logged-in visitor (user id, expiry,
    /// declared demographics); ingest checks it and keeps only what it vouches for.
    #[serde(default)]
    pub identity: Option<String>,
    /// A client-made id, used to drop duplicates of retried sends.
    #[serde(default)]
    pub event_id: Option<String>,
    /// When it happened on the client; the receive time is used when absent.
    #[serde(default)]
    pub ts: Option<DateTime<Utc>>,
    /// The ad, for impressions and clicks.
    #[serde(default)]
    pub ad: Option<AdRef>,
    /// Consent per purpose.
    #[serde(default)]
    pub consent: Option<Consent>,
    /// Declared demographics.
    #[serde(default)]
    pub demographics: Option<Demographics>,
    /// Free properties (scrubbed before storage).
    #[serde(default)]
    pub props: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Why a well-formed event is still refused; the message goes back to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A required field is absent.
    #[error("missing field `{field}`: required for {event_type} events")]
    Missing {
        /// The field.
        field: &'static str,
        /// The event's type.
        event_type: &'static str,
    },
    /// A field is longer than allowed.
    #[error("field `{field}` is {len} bytes long; at most {max} are accepted")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A URL does not parse as an absolute http(s) URL.
    #[error("field `{field}` is not an absolute http(s) URL")]
    NotAUrl {
        /// The field.
        field: &'static str,
    },
    /// An id holds a character outside letters, digits and `-_.:`.
    #[error("field `{field}` may hold only ASCII letters, digits and `-_.:`")]
    BadCharacter {
        /// The field.
        field: &'static str,
    },
    /// A field is present but empty.
    #[error("field `{field}` is empty")]
    Empty {
        /// The field.
        field: &'static str,
    },
    /// `props` has too many entries.
    #[error("`props` has {count} entries; at most {max} are accepted")]
    TooManyProps {
        /// How many were sent.
        count: usize,
        /// The limit.
        max: usize,
    },
}

fn check_id(field: &'static str, value: &Option<String>) -> Result<(), ValidationError> {
    if let Some(v) = value {
        if v.is_empty() {
            return Err(ValidationError::Empty { field });
        }
        if v.len() > MAX_ID_LEN {
            return Err(ValidationError::TooLong {
                field,
                len: v.len(),
                max: MAX_ID_LEN,
            });
        }
        // ids reach CSV exports, logs and URLs: no formula starts, separators or controls
        if !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)) {
            return Err(ValidationError::BadCharacter { field });
        }
    }
    Ok(())
}

fn check_url(field: &'static str, value: &Option<String>) -> Result<(), ValidationError> {
    if let Some(v) = value {
        if v.len() > MAX_URL_LEN {
            return Err(ValidationError::TooLong {
                field,
                len: v.len(),
                max: MAX_URL_LEN,
            });
        }
        let lower = v.get(..8).unwrap_or(v).to_ascii_lowercase();
        if !(lower.starts_with("http://") || lower.starts_with("https://")) {
            return Err(ValidationError::NotAUrl { field });
        }
    }
    Ok(())
}

impl Event {
    /// Checks what serde cannot: required fields per type, lengths, URL shape.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let event_type = self.event_type.as_str();
        check_url("url", &self.url)?;
        if let Some(r) = &self.referrer {
            // an empty referrer is what browsers send for direct visits
            if !r.is_empty() {
                check_url("referrer", &self.referrer)?;
            }
        }
        check_id("cookie_id", &self.cookie_id)?;
        check_id("user_id", &self.user_id)?;
        check_id("event_id", &self.event_id)?;
        if let Some(token) = &self.identity
            && token.len() > MAX_IDENTITY_LEN
        {
            return Err(ValidationError::TooLong {
                field: "identity",
                len: token.len(),
                max: MAX_IDENTITY_LEN,
            });
        }
        if let Some(d) = &self.demographics {
            check_id("demographics.age_band", &d.age_band)?;
            check_id("demographics.gender", &d.gender)?;
        }
        if matches!(self.event_type, EventType::PageView) && self.url.is_none() {
            return Err(ValidationError::Missing {
                field: "url",
                event_type,
            });
        }
        if matches!(self.event_type, EventType::AdImpression | EventType::AdClick) {
            let ad_id = self.ad.as_ref().and_then(|a| a.ad_id.as_ref());
            if ad_id.is_none() {
                return Err(ValidationError::Missing {
                    field: "ad.ad_id",
                    event_type,
                });
            }
        }
        if let Some(ad) = &self.ad {
            check_id("ad.ad_id", &ad.ad_id)?;
            check_id("ad.campaign_id", &ad.campaign_id)?;
            check_id("ad.placement", &ad.placement)?;
        }
        if let Some(props) = &self.props
            && props.len() > MAX_PROPS
        {
            return Err(ValidationError::TooManyProps {
                count: props.len(),
                max: MAX_PROPS,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Event, String> {
        serde_json::from_str::<Event>(json).map_err(|e| e.to_string())
    }

    #[test]
    fn the_contract_example_parses() {
        let ev = parse(
            r#"{"type":"page_view","url":"https://kulshi.example/ar/cars/toyota?id=123",
            "referrer":"https://www.google.com/","cookie_id":"c-7f3a","user_id":"u-1842",
            "event_id":"e1","ts":"2026-11-24T10:00:00Z",
            "ad":{"ad_id":"ad-9","campaign_id":"cmp-3","placement":"top-banner"},
            "consent":{"analytics":true,"personalisation":true,"marketing":false},
            "demographics":{"age_band":"25-34","gender":"female"},"props":{"search_query":"x"}}"#,
        )
        .expect("contract example");
        assert_eq!(ev.event_type, EventType::PageView);
        assert_eq!(ev.validate(), Ok(()));
    }

    #[test]
    fn unknown_fields_are_named() {
        let err =
            parse(r#"{"type":"page_view","url":"https://a.example/","colour":"red"}"#).expect_err("unknown field");
        assert!(err.contains("unknown field `colour`"), "{err}");
        let err = parse(r#"{"type":"ad_click","ad":{"ad_id":"a","size":3}}"#).expect_err("nested");
        assert!(err.contains("unknown field `size`"), "{err}");
    }

    #[test]
    fn unknown_types_and_wrong_types_are_refused() {
        let err = parse(r#"{"type":"page_vue","url":"https://a.example/"}"#).expect_err("type");
        assert!(err.contains("unknown variant `page_vue`"), "{err}");
        let err = parse(r#"{"type":"page_view","url":5}"#).expect_err("wrong type");
        assert!(err.contains("invalid type"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let ev = parse(r#"{"type":"page_view"}"#).expect("parses");
        assert_eq!(
            ev.validate().map_err(|e| e.to_string()),
            Err("missing field `url`: required for page_view events".into())
        );
        let ev = parse(r#"{"type":"ad_click","url":"https://a.example/"}"#).expect("parses");
        assert!(ev.validate().is_err());
        let ev = parse(r#"{"type":"page_view","url":"javascript:alert(1)"}"#).expect("parses");
        assert_eq!(ev.validate(), Err(ValidationError::NotAUrl { field: "url" }));
        let long = "x".repeat(MAX_ID_LEN + 1);
        let ev = parse(&format!(r#"{{"type":"search","cookie_id":"{long}"}}"#)).expect("parses");
        assert!(matches!(
            ev.validate(),
            Err(ValidationError::TooLong { field: "cookie_id", .. })
        ));
    }
}
