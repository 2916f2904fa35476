//! Device type, OS and browser from a `User-Agent`, with a cache: most
//! traffic repeats a few hundred agents.

use std::collections::HashMap;
use std::sync::Arc;

/// What a `User-Agent` says about the device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Device {
    /// `desktop`, `mobile`, `tablet`, `bot` or `other`.
    pub device_type: &'static str,
    /// e.g. `Android`, `iOS`, `Windows 10`.
    pub os: Option<String>,
    /// e.g. `Chrome`, `Safari`.
    pub browser: Option<String>,
    /// Major version.
    pub browser_version: Option<String>,
    /// Crawlers, bots and headless browsers.
    pub is_bot: bool,
}

fn known(s: &str) -> Option<String> {
    (s != woothee::woothee::VALUE_UNKNOWN && !s.is_empty()).then(|| s.to_owned())
}

/// Parses one agent without the cache.
pub fn parse_user_agent(agent: &str) -> Device {
    let lower = agent.to_ascii_lowercase();
    let headless = [
        "headless",
        "phantomjs",
        "puppeteer",
        "playwright",
        "selenium",
        "python-requests",
        "curl/",
        "wget/",
    ]
    .iter()
    .any(|m| lower.contains(m));
    let parser = woothee::parser::Parser::new();
    let Some(r) = parser.parse(agent) else {
        return Device {
            device_type: if headless { "bot" } else { "other" },
            is_bot: headless,
            ..Device::default()
        };
    };
    let is_bot = headless || r.category == "crawler" || lower.contains("bot") || lower.contains("spider");
    let tablet =
        lower.contains("ipad") || lower.contains("tablet") || (lower.contains("android") && !lower.contains("mobile"));
    let device_type = if is_bot {
        "bot"
    } else {
        match r.category {
            "pc" => "desktop",
            "smartphone" | "mobilephone" if tablet => "tablet",
            "smartphone" | "mobilephone" => "mobile",
            _ => "other",
        }
    };
    let version = known(r.version)
        .map(|v| v.split('.').next().unwrap_or_default().to_owned())
        .filter(|v| !v.is_empty());
    Device {
        device_type,
        os: known(r.os),
        browser: known(r.name),
        browser_version: version,
        is_bot,
    }
}

/// A parser with a bounded cache, one per processor worker.
#[derive(Debug, Default)]
pub struct UserAgentCache {
    cache: HashMap<String, Arc<Device>>,
}

/// Agents remembered before the cache starts over.
const CACHE_CAPACITY: usize = 10_000;

impl UserAgentCache {
    /// Parses `agent`, from the cache when seen before.
    pub fn parse(&mut self, agent: &str) -> Arc<Device> {
        if let Some(d) = self.cache.get(agent) {
            return d.clone();
        }
        if self.cache.len() >= CACHE_CAPACITY {
            self.cache.clear();
        }
        let d = Arc::new(parse_user_agent(agent));
        self.cache.insert(agent.to_owned(), d.clone());
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_agents() {
        let d = parse_user_agent(
            "Mozilla/5.0 (Linux; Android 13; SM-A536B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.144 Mobile Safari/537.36",
        );
        assert_eq!(
            (d.device_type, d.browser.as_deref(), d.browser_version.as_deref()),
            ("mobile", Some("Chrome"), Some("120"))
        );
        assert_eq!(d.os.as_deref(), Some("Android"));
        let d = parse_user_agent(
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/121.0.0.0 Safari/537.36",
        );
        assert_eq!(d.device_type, "desktop");
        let d = parse_user_agent(
            "Mozilla/5.0 (iPad; CPU OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
        );
        assert_eq!(d.device_type, "tablet");
        let d = parse_user_agent("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)");
        assert!(d.is_bot);
        let d = parse_user_agent(
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.0.0 Safari/537.36",
        );
        assert!(d.is_bot && d.device_type == "bot");
    }

    #[test]
    fn the_cache_answers_the_same() {
        let mut c = UserAgentCache::default();
        let a = c.parse("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1");
        let b = c.parse("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.device_type, "mobile");
    }
}
