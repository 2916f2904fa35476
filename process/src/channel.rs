//! Channel grouping: which marketing channel a session came through, from its
//! landing event's referrer domain and UTM tags, by the documented rules of
//! [`ChannelRules`] (configurable, with Arabic-region search engines and
//! social networks in the defaults).

use marsad_config::ChannelRules;

/// The channels a session can come through, as stored in `sources_hourly.channel`.
pub const CHANNELS: [&str; 8] = [
    "email",
    "paid_social",
    "paid_search",
    "display",
    "social",
    "organic_search",
    "referral",
    "direct",
];

/// A landing event's source, as `events` holds it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Source<'a> {
    /// `referrer_domain`: host name, lower case, without `www.`.
    pub referrer_domain: Option<&'a str>,
    /// `utm_source`.
    pub utm_source: Option<&'a str>,
    /// `utm_medium`.
    pub utm_medium: Option<&'a str>,
}

/// The channel rules, lower-cased once.
#[derive(Debug, Clone)]
pub struct ChannelGrouping {
    search: Vec<String>,
    social: Vec<String>,
    email: Vec<String>,
    paid: Vec<String>,
    display: Vec<String>,
    own: Vec<String>,
}

impl Default for ChannelGrouping {
    fn default() -> Self {
        ChannelGrouping::new(&ChannelRules::default())
    }
}

fn lower(list: &[String]) -> Vec<String> {
    list.iter()
        .map(|w| w.trim().trim_start_matches("www.").to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

/// Whether the host `domain` is `entry` or under it, or (an entry without a dot) has it as a label.
fn domain_matches(domain: &str, entry: &str) -> bool {
    if entry.contains('.') {
        domain == entry || domain.strip_suffix(entry).is_some_and(|rest| rest.ends_with('.'))
    } else {
        domain.split('.').any(|label| label == entry)
    }
}

/// Whether a `utm_source` value names `entry` (`facebook` names `facebook.com`).
fn source_matches(source: &str, entry: &str) -> bool {
    if source.contains('.') {
        return domain_matches(source, entry);
    }
    source == entry || entry.rsplit_once('.').is_some_and(|(name, _)| name == source)
}

impl ChannelGrouping {
    /// The grouping `rules` describe.
    pub fn new(rules: &ChannelRules) -> Self {
        ChannelGrouping {
            search: lower(&rules.search_engines),
            social: lower(&rules.social_networks),
            email: lower(&rules.email_mediums),
            paid: lower(&rules.paid_mediums),
            display: lower(&rules.display_mediums),
            own: lower(&rules.own_domains),
        }
    }

    /// The channel of a session that landed from `source` (one of [`CHANNELS`]).
    pub fn channel(&self, source: Source<'_>) -> &'static str {
        let medium = source.utm_medium.map(str::to_lowercase);
        let utm_source = source.utm_source.map(str::to_lowercase);
        let referrer = source
            .referrer_domain
            .map(str::to_lowercase)
            .filter(|d| !self.own.iter().any(|own| domain_matches(d, own)));
        let is = |list: &[String]| {
            referrer
                .as_deref()
                .is_some_and(|d| list.iter().any(|e| domain_matches(d, e)))
                || utm_source
                    .as_deref()
                    .is_some_and(|s| list.iter().any(|e| source_matches(s, e)))
        };
        let medium_in = |list: &[String]| medium.as_deref().is_some_and(|m| list.iter().any(|e| e == m));
        if medium_in(&self.email) {
            "email"
        } else if medium_in(&self.paid) {
            if is(&self.social) || medium.as_deref().is_some_and(|m| m.contains("social")) {
                "paid_social"
            } else {
                "paid_search"
            }
        } else if medium_in(&self.display) {
            "display"
        } else if is(&self.social) {
            "social"
        } else if is(&self.search) {
            "organic_search"
        } else if referrer.is_some() || utm_source.is_some() {
            "referral"
        } else {
            "direct"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(referrer: Option<&str>, source: Option<&str>, medium: Option<&str>) -> &'static str {
        let rules = ChannelRules {
            own_domains: vec!["kulshi.example".into()],
            ..ChannelRules::default()
        };
        ChannelGrouping::new(&rules).channel(Source {
            referrer_domain: referrer,
            utm_source: source,
            utm_medium: medium,
        })
    }

    #[test]
    fn the_documented_rules_in_their_order() {
        assert_eq!(of(None, None, None), "direct");
        assert_eq!(of(Some("kulshi.example"), None, None), "direct", "own site");
        assert_eq!(of(Some("m.kulshi.example"), None, None), "direct", "own subdomain");
        assert_eq!(of(Some("google.com.sa"), None, None), "organic_search");
        assert_eq!(of(Some("news.google.ae"), None, None), "organic_search");
        assert_eq!(of(Some("yamli.com"), None, None), "organic_search", "Arabic search");
        assert_eq!(of(Some("l.facebook.com"), None, None), "social");
        assert_eq!(of(Some("t.co"), None, None), "social");
        assert_eq!(of(Some("wa.me"), None, None), "social");
        assert_eq!(of(None, Some("snapchat"), None), "social", "a utm_source names it");
        assert_eq!(of(Some("google.com"), Some("google"), Some("CPC")), "paid_search");
        assert_eq!(of(Some("instagram.com"), Some("instagram"), Some("cpc")), "paid_social");
        assert_eq!(of(None, Some("meta"), Some("paid_social")), "paid_social");
        assert_eq!(of(None, Some("newsletter"), Some("email")), "email");
        assert_eq!(of(Some("google.com"), None, Some("email")), "email", "e-mail first");
        assert_eq!(of(None, Some("dv360"), Some("display")), "display");
        assert_eq!(of(Some("opensooq.com"), None, None), "referral");
        assert_eq!(of(None, Some("partner-app"), None), "referral");
    }

    #[test]
    fn entries_match_whole_labels_only() {
        // `x.com` must not make every domain ending in "x.com" social, nor `t.co` "bot.co"
        assert_eq!(of(Some("box.com"), None, None), "referral");
        assert_eq!(of(Some("bot.co"), None, None), "referral");
        assert_eq!(of(Some("googleplex.example"), None, None), "referral");
    }

    #[test]
    fn every_answer_is_a_listed_channel() {
        for r in [None, Some("google.com"), Some("x.com"), Some("a.example")] {
            for m in [None, Some("cpc"), Some("email"), Some("display"), Some("other")] {
                assert!(CHANNELS.contains(&of(r, Some("s"), m)));
            }
        }
    }
}
