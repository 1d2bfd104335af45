//! Where webhook requests may go (SSRF): public addresses only, unless the configuration allows
//! an internal network (`egress.allow`). Internal means loopback, private (RFC 1918, unique
//! local), link-local (where cloud metadata services answer, 169.254.169.254), shared (CGNAT),
//! unspecified, broadcast and multicast addresses.
//!
//! Checked before any connection: a URL whose host is an address, when the endpoint is created;
//! a host name, on every resolution (so also after a DNS change, and on every retry) — only its
//! permitted addresses are used, and none left is an error that names no address. Redirects are
//! never followed (see [`super::sink`]).

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// The networks webhooks may reach although internal.
#[derive(Clone, Debug, Default)]
pub struct EgressPolicy {
    pub allow: Vec<IpNet>,
}

/// Why a request may not go out.
pub const REFUSED: &str = "refused by the egress policy: the endpoint is internal (loopback, private or link-local); \
     allow its network in egress.allow if it is meant";

impl EgressPolicy {
    pub fn new(allow: Vec<IpNet>) -> Self {
        EgressPolicy { allow }
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        !is_internal(ip) || self.allow.iter().any(|n| n.contains(&ip))
    }

    /// Refuses a URL whose host is a forbidden address (a name is checked when resolved).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), &'static str> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
            _ => return Ok(()),
        };
        if self.permits(ip) {
            Ok(())
        } else {
            Err(REFUSED)
        }
    }

    /// An HTTP client that resolves names through this policy.
    pub fn client_builder(self: &Arc<Self>) -> reqwest::ClientBuilder {
        reqwest::Client::builder().dns_resolver(Arc::new(PolicyResolver(self.clone())))
    }
}

fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 192 && b == 0 && v4.octets()[2] == 0) // IETF protocol assignments
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
        }
    }
}

/// The system resolver, keeping only the addresses the policy permits.
struct PolicyResolver(Arc<EgressPolicy>);

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let permitted: Vec<SocketAddr> = found.into_iter().filter(|a| policy.permits(a.ip())).collect();
            if permitted.is_empty() {
                return Err(Box::new(std::io::Error::other(REFUSED)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(permitted.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused_unless_allowed() {
        let none = EgressPolicy::default();
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(!none.permits(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "100.128.0.1", "172.32.0.1"] {
            assert!(none.permits(ip.parse().unwrap()), "{ip}");
        }
        let loopback = EgressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(loopback.permits("127.0.0.1".parse().unwrap()));
        assert!(!loopback.permits("169.254.169.254".parse().unwrap()));
    }
}
