//! Page categories from URL paths, in Arabic and English.

/// Categories and the path segments that mean them.
const RULES: &[(&str, &[&str])] = &[
    (
        "cars",
        &["cars", "car", "vehicles", "motors", "سيارات", "سيارة", "مركبات"],
    ),
    (
        "real_estate",
        &[
            "real-estate",
            "realestate",
            "property",
            "properties",
            "apartments",
            "عقارات",
            "شقق",
            "أراضي",
        ],
    ),
    ("jobs", &["jobs", "job", "careers", "وظائف", "وظيفة"]),
    (
        "electronics",
        &[
            "electronics",
            "mobiles",
            "phones",
            "computers",
            "إلكترونيات",
            "الكترونيات",
            "موبايلات",
        ],
    ),
    ("furniture", &["furniture", "home", "أثاث", "اثاث"]),
    ("services", &["services", "service", "خدمات"]),
];

/// The category of a scrubbed page path: the first segment that names one, else `other`.
pub fn page_category(path: &str) -> &'static str {
    let path = path.split('?').next().unwrap_or(path);
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        let lower = segment.to_lowercase();
        for (category, words) in RULES {
            if words.contains(&lower.as_str()) {
                return category;
            }
        }
    }
    "other"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arabic_and_english_paths() {
        assert_eq!(page_category("/ar/سيارات/تويوتا"), "cars");
        assert_eq!(page_category("/en/cars/toyota?page=2"), "cars");
        assert_eq!(page_category("/ar/عقارات/شقق-للايجار"), "real_estate");
        assert_eq!(page_category("/en/Jobs"), "jobs");
        assert_eq!(page_category("/"), "other");
    }
}
