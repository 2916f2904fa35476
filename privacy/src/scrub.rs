//! Page paths and referrers without personal data. Emails and phone numbers
//! (Latin, Arabic-Indic ٠-٩ and Eastern Arabic-Indic ۰-۹ digits) become
//! markers so pages stay countable; query parameters survive only by an
//! allow-list; referrers are reduced to their domain.

use std::sync::LazyLock;

use percent_encoding::percent_decode_str;
use regex::Regex;

/// Replaces email addresses.
pub const EMAIL_MARKER: &str = "[email]";
/// Replaces phone numbers and long digit runs.
pub const PHONE_MARKER: &str = "[phone]";

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)[a-z0-9._%+\-]+@[a-z0-9\-]+(?:\.[a-z0-9\-]+)*\.[a-z]{2,}").unwrap_or_else(|_| unreachable!())
});
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    // seven or more digits in any of the three digit sets, with the separators people type
    Regex::new(r"(?:\+|00)?[0-9٠-٩۰-۹](?:[\s\-.()/]*[0-9٠-٩۰-۹]){6,}").unwrap_or_else(|_| unreachable!())
});

/// A URL reduced to what may be stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubbedPage {
    /// Decoded path with markers, plus allow-listed non-`utm_` parameters.
    pub page_path: String,
    /// `utm_source`, if allow-listed and present.
    pub utm_source: Option<String>,
    /// `utm_medium`.
    pub utm_medium: Option<String>,
    /// `utm_campaign`.
    pub utm_campaign: Option<String>,
}

/// Which query parameters may be kept.
#[derive(Debug, Clone)]
pub struct QueryAllowList {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl QueryAllowList {
    /// From config patterns: a name, or a prefix ending in `*`.
    pub fn new(patterns: &[String]) -> Self {
        let mut exact = Vec::new();
        let mut prefixes = Vec::new();
        for p in patterns {
            match p.strip_suffix('*') {
                Some(prefix) => prefixes.push(prefix.to_ascii_lowercase()),
                None => exact.push(p.to_ascii_lowercase()),
            }
        }
        QueryAllowList { exact, prefixes }
    }

    /// Whether `name` may be kept.
    pub fn allows(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.exact.contains(&name) || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }
}

/// Replaces emails and phone numbers in decoded text with markers.
pub fn scrub_text(text: &str) -> String {
    let no_email = EMAIL.replace_all(text, EMAIL_MARKER);
    PHONE.replace_all(&no_email, PHONE_MARKER).into_owned()
}

fn decode(s: &str) -> String {
    percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// Scrubs a page URL: decoded path with markers, allow-listed parameters only, no fragment.
pub fn scrub_url(raw: &str, allow: &QueryAllowList) -> ScrubbedPage {
    let Ok(url) = url::Url::parse(raw) else {
        return ScrubbedPage {
            page_path: "[invalid]".into(),
            ..ScrubbedPage::default()
        };
    };
    let path = percent_decode_str(url.path()).decode_utf8_lossy();
    let mut page = ScrubbedPage {
        page_path: scrub_text(&path),
        ..ScrubbedPage::default()
    };
    let mut kept = Vec::new();
    for pair in url.query().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(k);
        if !allow.allows(&name) {
            continue;
        }
        let value = scrub_text(&decode(v));
        match name.to_ascii_lowercase().as_str() {
            "utm_source" => page.utm_source = Some(value),
            "utm_medium" => page.utm_medium = Some(value),
            "utm_campaign" => page.utm_campaign = Some(value),
            n if n.starts_with("utm_") => {}
            _ => kept.push(format!("{}={}", scrub_text(&name), value)),
        }
    }
    if !kept.is_empty() {
        page.page_path.push('?');
        page.page_path.push_str(&kept.join("&"));
    }
    page
}

/// The referrer's host name, lower case, without `www.`; nothing else of it is kept.
pub fn referrer_domain(raw: &str) -> Option<String> {
    let url = url::Url::parse(raw).ok()?;
    let host = url.host_str()?.to_ascii_lowercase();
    let host = host.strip_prefix("www.").unwrap_or(&host).to_owned();
    if EMAIL.is_match(&host) || host.is_empty() {
        return None;
    }
    Some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow() -> QueryAllowList {
        QueryAllowList::new(&["utm_*".into(), "category".into(), "page".into()])
    }

    #[test]
    fn keeps_only_allowed_parameters() {
        let p = scrub_url(
            "https://kulshi.example/ar/cars/toyota?id=123&utm_source=google&page=2&name=Ahmad#top",
            &allow(),
        );
        assert_eq!(p.page_path, "/ar/cars/toyota?page=2");
        assert_eq!(p.utm_source.as_deref(), Some("google"));
    }

    #[test]
    fn decodes_arabic_paths() {
        let p = scrub_url(
            "https://kulshi.example/ar/%D8%B3%D9%8A%D8%A7%D8%B1%D8%A7%D8%AA",
            &allow(),
        );
        assert_eq!(p.page_path, "/ar/سيارات");
    }

    #[test]
    fn markers_replace_emails_and_phones() {
        let p = scrub_url(
            "https://kulshi.example/contact/ahmad%40example.com/0791234567",
            &allow(),
        );
        assert_eq!(p.page_path, "/contact/[email]/[phone]");
        assert_eq!(scrub_text("اتصل ٠٧٩١٢٣٤٥٦٧ الآن"), "اتصل [phone] الآن");
        assert_eq!(scrub_text("call +962 79 123 4567"), "call [phone]");
        assert_eq!(scrub_text("۰۵۰۱۲۳۴۵۶۷"), "[phone]");
        assert_eq!(scrub_text("/ar/cars/2019"), "/ar/cars/2019");
    }

    #[test]
    fn referrers_become_domains() {
        assert_eq!(
            referrer_domain("https://www.Google.com/search?q=me@x.com").as_deref(),
            Some("google.com")
        );
        assert_eq!(referrer_domain("not a url"), None);
    }
}
