//! Location from the full IP address; the caller drops the address after.
//! Reads GeoIP2/GeoLite2 City and Country databases and the ip-location-db
//! layout (`country_code`, `state1`, `city`) of the bundled database.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// The bundled country database (ip-location-db geo-whois-asn-country, CC BY 4.0 by the NRO).
static BUNDLED_COUNTRY_DB: &[u8] = include_bytes!("../../geoip/geo-whois-asn-country.mmdb");

/// Where a visitor is, as far as the database knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location {
    /// ISO 3166-1 alpha-2.
    pub country: Option<String>,
    /// First-level subdivision (English name).
    pub region: Option<String>,
    /// City (English name).
    pub city: Option<String>,
}

#[derive(Deserialize)]
struct Named<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
    #[serde(borrow, default)]
    names: Option<BTreeMap<&'a str, &'a str>>,
}

impl<'a> Named<'a> {
    fn english(&self) -> Option<&'a str> {
        self.names.as_ref().and_then(|n| n.get("en").copied())
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum CityField<'a> {
    Plain(&'a str),
    #[serde(borrow)]
    Named(Named<'a>),
}

#[derive(Deserialize)]
struct GeoRecord<'a> {
    #[serde(borrow, default)]
    country: Option<Named<'a>>,
    #[serde(borrow, default)]
    registered_country: Option<Named<'a>>,
    #[serde(borrow, default)]
    country_code: Option<&'a str>,
    #[serde(borrow, default)]
    subdivisions: Option<Vec<Named<'a>>>,
    #[serde(borrow, default)]
    state1: Option<&'a str>,
    #[serde(borrow, default)]
    city: Option<CityField<'a>>,
}

/// GeoIP databases asked in order, shared read-only by every processor thread.
pub struct GeoIp {
    readers: Vec<maxminddb::Reader<Cow<'static, [u8]>>>,
    source: String,
}

impl std::fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoIp").field("source", &self.source).finish()
    }
}

impl GeoIp {
    /// The country database that ships with Marsad.
    pub fn bundled() -> Result<Self> {
        Self::from_bytes(
            Cow::Borrowed(BUNDLED_COUNTRY_DB),
            "bundled geo-whois-asn-country".into(),
        )
    }

    /// Database files (e.g. DB-IP Lite City's IPv4 and IPv6 files), asked in order.
    pub fn open(paths: &[&Path]) -> Result<Self> {
        let mut readers = Vec::with_capacity(paths.len());
        for path in paths {
            let bytes = std::fs::read(path).map_err(|e| Error::Io {
                what: "GeoIP database",
                path: (*path).into(),
                source: e,
            })?;
            readers.push(Self::reader(Cow::Owned(bytes), &path.display().to_string())?);
        }
        let source = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(GeoIp { readers, source })
    }

    /// The configured databases, or the bundled one when none is configured.
    pub fn from_config(paths: &[std::path::PathBuf]) -> Result<Self> {
        if paths.is_empty() {
            return Self::bundled();
        }
        Self::open(&paths.iter().map(|p| p.as_path()).collect::<Vec<_>>())
    }

    fn reader(bytes: Cow<'static, [u8]>, source: &str) -> Result<maxminddb::Reader<Cow<'static, [u8]>>> {
        maxminddb::Reader::from_source(bytes).map_err(|e| Error::GeoIp {
            path: source.to_owned(),
            reason: e.to_string(),
        })
    }

    fn from_bytes(bytes: Cow<'static, [u8]>, source: String) -> Result<Self> {
        Ok(GeoIp {
            readers: vec![Self::reader(bytes, &source)?],
            source,
        })
    }

    /// Which database this is (for logs and `/readyz`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Looks `ip` up in each database until one places it; unknown and private addresses give an empty location.
    pub fn lookup(&self, ip: IpAddr) -> Location {
        for reader in &self.readers {
            let loc = Self::lookup_in(reader, ip);
            if loc.country.is_some() {
                return loc;
            }
        }
        Location::default()
    }

    fn lookup_in(reader: &maxminddb::Reader<Cow<'static, [u8]>>, ip: IpAddr) -> Location {
        let Ok(result) = reader.lookup(ip) else {
            return Location::default();
        };
        let Ok(Some(rec)) = result.decode::<GeoRecord<'_>>() else {
            return Location::default();
        };
        let country = rec
            .country
            .as_ref()
            .and_then(|c| c.iso_code)
            .or(rec.country_code)
            .or(rec.registered_country.as_ref().and_then(|c| c.iso_code))
            .filter(|c| c.len() == 2)
            .map(|c| c.to_ascii_uppercase());
        let region = rec
            .subdivisions
            .as_ref()
            .and_then(|s| s.first())
            .and_then(|s| s.english())
            .or(rec.state1)
            .map(str::to_owned);
        let city = match &rec.city {
            Some(CityField::Plain(c)) => Some((*c).to_owned()),
            Some(CityField::Named(n)) => n.english().map(str::to_owned),
            None => None,
        };
        Location { country, region, city }
    }
}

/// Addresses the bundled database places in the site's main markets; the simulator draws from their /16s.
pub const SAMPLE_ADDRESSES: &[(&str, &str)] = &[
    ("176.29.10.1", "JO"),
    ("94.249.10.1", "JO"),
    ("188.48.10.1", "SA"),
    ("51.36.10.1", "SA"),
    ("94.200.10.1", "AE"),
    ("86.96.10.1", "AE"),
    ("41.32.10.1", "EG"),
    ("197.32.10.1", "EG"),
    ("37.236.10.1", "IQ"),
    ("149.255.200.1", "IQ"),
    ("8.8.8.8", "US"),
    ("81.2.69.1", "GB"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmdb_writer::{MmdbValue, MmdbWriter};

    fn city_db() -> GeoIp {
        let mut w = MmdbWriter::new("GeoIP2-City");
        w.insert(
            "176.29.0.0/16".parse().expect("net"),
            &MmdbValue::map([
                (
                    "country",
                    MmdbValue::map([
                        ("iso_code", MmdbValue::str("JO")),
                        ("names", MmdbValue::map([("en", MmdbValue::str("Jordan"))])),
                    ]),
                ),
                (
                    "subdivisions",
                    MmdbValue::Array(vec![MmdbValue::map([(
                        "names",
                        MmdbValue::map([("en", MmdbValue::str("Amman Governorate"))]),
                    )])]),
                ),
                (
                    "city",
                    MmdbValue::map([("names", MmdbValue::map([("en", MmdbValue::str("Amman"))]))]),
                ),
            ]),
        );
        w.insert(
            "2a00:1a00::/32".parse().expect("net"),
            &MmdbValue::map([
                ("country_code", MmdbValue::str("SA")),
                ("state1", MmdbValue::str("Riyadh")),
                ("city", MmdbValue::str("Riyadh")),
            ]),
        );
        GeoIp::from_bytes(Cow::Owned(w.to_bytes()), "fixture".into()).expect("fixture db opens")
    }

    #[test]
    fn reads_both_layouts() {
        let db = city_db();
        let loc = db.lookup("176.29.7.8".parse().expect("ip"));
        assert_eq!(loc.country.as_deref(), Some("JO"));
        assert_eq!(loc.region.as_deref(), Some("Amman Governorate"));
        assert_eq!(loc.city.as_deref(), Some("Amman"));
        let loc = db.lookup("2a00:1a00::1".parse().expect("ip"));
        assert_eq!(
            (loc.country.as_deref(), loc.city.as_deref()),
            (Some("SA"), Some("Riyadh"))
        );
        assert_eq!(db.lookup("8.8.8.8".parse().expect("ip")), Location::default());
        assert_eq!(
            db.lookup("::ffff:176.29.7.8".parse().expect("ip")).country,
            None,
            "mapped v6 is a caller concern"
        );
    }

    #[test]
    fn the_bundled_database_knows_the_simulator_ranges() {
        let db = GeoIp::bundled().expect("bundled db");
        for (ip, country) in crate::geoip::SAMPLE_ADDRESSES {
            assert_eq!(
                db.lookup(ip.parse().expect("ip")).country.as_deref(),
                Some(*country),
                "{ip}"
            );
        }
    }
}
