//! The client's address, as the audit trail and the per-address token rate limit record it.
//!
//! Behind a TLS-terminating proxy every connection comes from the proxy. With `trusted_proxies`
//! set (IP addresses or CIDR ranges), a connection from one of them is attributed to the address
//! the proxies appended to `X-Forwarded-For`: read from the right, the first address that is not
//! a trusted proxy (so a client cannot choose its address by sending the header itself). With
//! the setting empty (the default) the header is ignored and the peer address is the client.

use std::net::IpAddr;

use actix_web::{web, HttpRequest};
use ipnet::IpNet;

use crate::startup::AppState;

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// A comma-separated list of IP addresses and CIDR ranges; empty for none.
    pub fn parse(list: &str) -> Result<Self, &'static str> {
        let mut nets = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let net = match item.parse::<IpNet>() {
                Ok(net) => net,
                Err(_) => item
                    .parse::<IpAddr>()
                    .map(IpNet::from)
                    .map_err(|_| "expected IP addresses or CIDR ranges, separated by commas")?,
            };
            nets.push(net);
        }
        Ok(Self(nets))
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client of a connection from `peer` that carried the `X-Forwarded-For` values
    /// `forwarded` (each header's value, in order).
    pub fn client<'a>(
        &self,
        peer: Option<IpAddr>,
        forwarded: impl Iterator<Item = &'a str>,
    ) -> Option<IpAddr> {
        let peer = peer?;
        if !self.trusts(peer) {
            return Some(peer);
        }
        let hops: Vec<&str> = forwarded
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            // Anything that is not an address ends the chain of trust: keep the last proxy.
            let Ok(ip) = hop.parse::<IpAddr>() else {
                return Some(client);
            };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        Some(client)
    }
}

/// The client address of `req` (see the module doc).
pub fn client_ip(req: &HttpRequest) -> Option<IpAddr> {
    let peer = req.peer_addr().map(|a| a.ip());
    match req.app_data::<web::Data<AppState>>() {
        Some(state) => state.trusted_proxies.client(
            peer,
            req.headers()
                .get_all("x-forwarded-for")
                .filter_map(|v| v.to_str().ok()),
        ),
        None => peer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        let none = TrustedProxies::default();
        assert_eq!(
            none.client(Some(ip("10.0.0.5")), ["203.0.113.7"].into_iter()),
            Some(ip("10.0.0.5"))
        );
    }

    #[test]
    fn a_trusted_proxy_hands_over_the_first_untrusted_address_from_the_right() {
        let proxies = TrustedProxies::parse("10.0.0.0/8, 192.0.2.1").unwrap();
        // Client -> 192.0.2.1 -> 10.0.0.5 -> gateway.
        assert_eq!(
            proxies.client(
                Some(ip("10.0.0.5")),
                ["198.51.100.9, 203.0.113.7, 192.0.2.1"].into_iter()
            ),
            Some(ip("203.0.113.7")),
            "198.51.100.9 was sent by the client itself and is not believed"
        );
        // Two headers count as one list.
        assert_eq!(
            proxies.client(
                Some(ip("10.0.0.5")),
                ["203.0.113.7", "192.0.2.1"].into_iter()
            ),
            Some(ip("203.0.113.7"))
        );
        // No header, or garbage: the proxy itself.
        assert_eq!(
            proxies.client(Some(ip("10.0.0.5")), std::iter::empty()),
            Some(ip("10.0.0.5"))
        );
        assert_eq!(
            proxies.client(Some(ip("10.0.0.5")), ["not-an-ip"].into_iter()),
            Some(ip("10.0.0.5"))
        );
        // An untrusted peer's header is ignored.
        assert_eq!(
            proxies.client(Some(ip("203.0.113.50")), ["198.51.100.9"].into_iter()),
            Some(ip("203.0.113.50"))
        );
    }

    #[test]
    fn the_list_takes_addresses_and_ranges_and_refuses_anything_else() {
        assert!(TrustedProxies::parse("").unwrap().0.is_empty());
        assert_eq!(
            TrustedProxies::parse("127.0.0.1, ::1, 10.0.0.0/8")
                .unwrap()
                .0
                .len(),
            3
        );
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
        assert!(TrustedProxies::parse("proxy.example").is_err());
    }
}
