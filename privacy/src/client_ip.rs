//! Which address is the visitor's: the socket peer, or behind configured
//! proxies the right-most `X-Forwarded-For` hop that is not a trusted proxy.
//! Anyone else's `X-Forwarded-For` is ignored, so clients cannot choose their
//! own location.

use std::net::IpAddr;

use ipnet::IpNet;

/// The proxies whose forwarding headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl TrustedProxies {
    /// Trusts the given networks.
    pub fn new(nets: Vec<IpNet>) -> Self {
        TrustedProxies { nets }
    }

    /// Whether `ip` is one of the trusted proxies (whose forwarding headers are believed).
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The visitor's address for a request from `peer` carrying `forwarded_for` headers (in order).
    pub fn client_ip<'a>(&self, peer: IpAddr, forwarded_for: impl IntoIterator<Item = &'a str>) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return peer;
        }
        let hops: Vec<&str> = forwarded_for.into_iter().flat_map(|h| h.split(',')).collect();
        let mut last_seen = peer;
        for hop in hops.iter().rev() {
            let Some(ip) = parse_hop(hop) else {
                // an unparseable hop was added by something untrusted: stop at the last good one
                return last_seen;
            };
            if !self.trusts(ip) {
                return ip;
            }
            last_seen = ip;
        }
        last_seen
    }
}

/// Parses one hop: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]:443`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok().map(canonical);
    }
    let (host, port) = hop.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse().ok().map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test ip")
    }

    fn proxies() -> TrustedProxies {
        TrustedProxies::new(vec![
            "10.0.0.0/8".parse().expect("net"),
            "127.0.0.1/32".parse().expect("net"),
        ])
    }

    #[test]
    fn untrusted_peers_cannot_forward() {
        assert_eq!(proxies().client_ip(ip("203.0.113.9"), ["1.2.3.4"]), ip("203.0.113.9"));
    }

    #[test]
    fn takes_the_right_most_untrusted_hop() {
        let p = proxies();
        assert_eq!(
            p.client_ip(ip("127.0.0.1"), ["6.6.6.6, 176.29.1.2, 10.1.1.1"]),
            ip("176.29.1.2")
        );
        assert_eq!(
            p.client_ip(ip("10.0.0.2"), ["6.6.6.6", "176.29.1.2:5555"]),
            ip("176.29.1.2")
        );
        assert_eq!(p.client_ip(ip("10.0.0.2"), ["[2001:db8::7]:443"]), ip("2001:db8::7"));
        assert_eq!(p.client_ip(ip("::ffff:10.0.0.2"), ["2.2.2.2"]), ip("2.2.2.2"));
        assert_eq!(p.client_ip(ip("10.0.0.2"), Vec::<&str>::new()), ip("10.0.0.2"));
        assert_eq!(p.client_ip(ip("10.0.0.2"), ["garbage, 10.0.0.3"]), ip("10.0.0.3"));
    }
}

/// The network an address belongs to: /24 for IPv4, /48 for IPv6 (the stricter mode's GeoIP input).
pub fn truncate(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            IpAddr::V4(std::net::Ipv4Addr::new(o[0], o[1], o[2], 0))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0))
        }
    }
}

#[cfg(test)]
mod truncate_tests {
    use super::*;

    #[test]
    fn keeps_only_the_network() {
        assert_eq!(
            truncate(
                "176.29.10.77"
                    .parse()
                    .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
            )
            .to_string(),
            "176.29.10.0"
        );
        assert_eq!(
            truncate(
                "2a00:1a00:7:8::1"
                    .parse()
                    .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
            )
            .to_string(),
            "2a00:1a00:7::"
        );
        assert_eq!(
            truncate(
                "::ffff:10.1.2.3"
                    .parse()
                    .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
            )
            .to_string(),
            "10.1.2.0"
        );
    }
}
