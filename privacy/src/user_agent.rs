//! Device type, OS and browser from a `User-Agent`, with a cache: most
//! traffic repeats a few hundred agents.

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

/// A parser with a bounded cache, one per processor worker: the least recently used agent
/// is forgotten first, so the few hundred agents most traffic carries stay cached however
/// many rare ones pass.
#[derive(Debug)]
pub struct UserAgentCache {
    cache: lru::LruCache<Box<str>, Arc<Device>>,
    hits: u64,
    misses: u64,
}

/// Agents remembered by default.
pub const CACHE_CAPACITY: usize = 10_000;
/// Longer agents are parsed but not remembered, so the cache's memory stays bounded
/// (at most [`CACHE_CAPACITY`] × this many bytes of keys) whatever clients send.
pub const CACHED_AGENT_MAX_BYTES: usize = 512;

impl Default for UserAgentCache {
    fn default() -> Self {
        Self::with_capacity(CACHE_CAPACITY)
    }
}

impl UserAgentCache {
    /// A cache of at most `capacity` agents.
    pub fn with_capacity(capacity: usize) -> Self {
        UserAgentCache {
            cache: lru::LruCache::new(std::num::NonZeroUsize::new(capacity).unwrap_or(std::num::NonZeroUsize::MIN)),
            hits: 0,
            misses: 0,
        }
    }

    /// Parses `agent`, from the cache when seen before.
    pub fn parse(&mut self, agent: &str) -> Arc<Device> {
        if let Some(d) = self.cache.get(agent) {
            self.hits += 1;
            return d.clone();
        }
        self.misses += 1;
        let d = Arc::new(parse_user_agent(agent));
        if agent.len() <= CACHED_AGENT_MAX_BYTES {
            self.cache.put(agent.into(), d.clone());
        }
        d
    }

    /// Agents remembered now.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Answers from the cache and parses so far.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (self.hits, self.misses)
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

    #[test]
    fn common_agents_stay_cached_while_rare_ones_pass() {
        let mut c = UserAgentCache::with_capacity(100);
        let common = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/121.0.0.0 Safari/537.36";
        c.parse(common);
        for i in 0..10_000 {
            c.parse(&format!("RareBot/{i}.0 (+https://example.com/bot)"));
            c.parse(common);
        }
        assert!(c.len() <= 100, "bounded: {}", c.len());
        let (hits, misses) = c.hits_and_misses();
        // one miss for the common agent (its first sight), one per rare agent
        assert_eq!(misses, 10_001, "the common agent was forgotten: {hits} hits");
        assert_eq!(hits, 10_000);
        // an agent too long to remember is parsed every time, never kept
        let long = format!("Mozilla/5.0 {}", "x".repeat(CACHED_AGENT_MAX_BYTES));
        c.parse(&long);
        c.parse(&long);
        assert_eq!(c.hits_and_misses().1, 10_003);
    }
}
