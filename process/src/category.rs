//! Page categories from URL paths, in Arabic and English, by configurable rules.

use std::sync::Arc;

use marsad_config::{PageCategoryRule, default_page_categories};

/// The category rules, ready to match paths.
#[derive(Debug, Clone)]
pub struct PageCategories {
    rules: Vec<(Arc<str>, Vec<String>)>,
    other: Arc<str>,
}

impl Default for PageCategories {
    fn default() -> Self {
        Self::new(&default_page_categories())
    }
}

impl PageCategories {
    /// Compiles the configured rules (words are matched in lower case).
    pub fn new(rules: &[PageCategoryRule]) -> Self {
        PageCategories {
            rules: rules
                .iter()
                .map(|r| {
                    (
                        Arc::from(r.category.as_str()),
                        r.path_segments.iter().map(|w| w.to_lowercase()).collect(),
                    )
                })
                .collect(),
            other: Arc::from("other"),
        }
    }

    /// The category of a scrubbed page path: the first segment that names one, else `other`.
    pub fn categorize(&self, path: &str) -> Arc<str> {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            let lower = segment.to_lowercase();
            for (category, words) in &self.rules {
                if words.contains(&lower) {
                    return category.clone();
                }
            }
        }
        self.other.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arabic_and_english_paths() {
        let c = PageCategories::default();
        assert_eq!(&*c.categorize("/ar/سيارات/تويوتا"), "cars");
        assert_eq!(&*c.categorize("/en/cars/toyota?page=2"), "cars");
        assert_eq!(&*c.categorize("/ar/عقارات/شقق-للايجار"), "real_estate");
        assert_eq!(&*c.categorize("/en/Jobs"), "jobs");
        assert_eq!(&*c.categorize("/"), "other");
    }

    #[test]
    fn configured_rules_replace_the_defaults() {
        let c = PageCategories::new(&[PageCategoryRule {
            category: "boats".into(),
            path_segments: vec!["Boats".into(), "قوارب".into()],
        }]);
        assert_eq!(&*c.categorize("/ar/قوارب/1"), "boats");
        assert_eq!(&*c.categorize("/en/boats"), "boats");
        assert_eq!(&*c.categorize("/en/cars"), "other");
    }
}
