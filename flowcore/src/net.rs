//! Where outbound HTTP may go: the guard against server-side request forgery that
//! `http_request` (and every node that calls out) obeys.
//!
//! A flow author, or a webhook caller through a templated URL, must not make the server call its
//! own API, its metrics, the cloud's metadata service or the private network behind it. A
//! [`Guard`] denies address ranges (by default loopback, link-local, private, unspecified and the
//! server's own addresses) and lets named exceptions through. It is checked on the address of
//! every connection after DNS resolution (so a name that resolves, or re-resolves, to a denied
//! address is refused), and on every redirect hop.
//!
//! ```
//! use flowcore::net::Guard;
//!
//! let guard = Guard::default();
//! assert!(guard.check_ip("93.184.216.34".parse().unwrap()).is_ok());
//! assert!(guard.check_ip("127.0.0.1".parse().unwrap()).is_err());
//! assert!(guard.check_ip("::ffff:169.254.169.254".parse().unwrap()).is_err());
//!
//! let local_model = Guard::parse(None, Some("127.0.0.1/32")).unwrap();
//! assert!(local_model.check_ip("127.0.0.1".parse().unwrap()).is_ok());
//! ```

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// The default deny list (`FLOWCORE_HTTP_DENY`).
pub const DEFAULT_DENY: &str = "loopback,link-local,private,unspecified,self";

/// Named ranges of the deny list.
const NAMED: &[(&str, &[&str])] = &[
    ("loopback", &["127.0.0.0/8", "::1/128"]),
    ("link-local", &["169.254.0.0/16", "fe80::/10"]),
    // RFC 1918, shared address space (100.64.0.0/10: carrier-grade NAT, some clouds' metadata
    // services), IETF protocol assignments, benchmarking, multicast, reserved, broadcast, IPv6
    // unique-local and site-local, IPv6 multicast.
    (
        "private",
        &[
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "192.0.0.0/24",
            "198.18.0.0/15",
            "224.0.0.0/4",
            "240.0.0.0/4",
            "fc00::/7",
            "fec0::/10",
            "ff00::/8",
        ],
    ),
    // 0.0.0.0/8 reaches this host on Linux.
    ("unspecified", &["0.0.0.0/8", "::/128"]),
];

/// What outbound connections may reach.
#[derive(Clone)]
pub struct Guard {
    /// Denied ranges, each with the word or CIDR it came from.
    deny: Vec<(IpNet, String)>,
    /// Whether `self` is in the deny list: the addresses of [`Guard::with_own_addresses`].
    deny_self: bool,
    own: Vec<IpAddr>,
    allow_nets: Vec<IpNet>,
    /// `host:port` exceptions, host lowercased; matched on the URL before resolution.
    allow_hosts: Vec<(String, u16)>,
}

impl Default for Guard {
    /// [`DEFAULT_DENY`], nothing allowed past it.
    fn default() -> Self {
        Self::parse(None, None).unwrap_or_else(|_| Self::open())
    }
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field(
                "deny",
                &self.deny.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("deny_self", &self.deny_self)
            .field("allow_nets", &self.allow_nets)
            .field("allow_hosts", &self.allow_hosts)
            .finish()
    }
}

impl Guard {
    /// A guard that denies nothing (for tests and trusted embedders).
    pub fn open() -> Self {
        Self {
            deny: Vec::new(),
            deny_self: false,
            own: Vec::new(),
            allow_nets: Vec::new(),
            allow_hosts: Vec::new(),
        }
    }

    /// A guard from the values of `FLOWCORE_HTTP_DENY` (comma-separated CIDR ranges, addresses
    /// and the words `loopback`, `link-local`, `private`, `unspecified`, `self`; `None` for
    /// [`DEFAULT_DENY`]; a value replaces the default) and `FLOWCORE_HTTP_ALLOW` (CIDR ranges,
    /// addresses, or `host:port`, IPv6 as `[addr]:port`). The error names the variable.
    pub fn parse(deny: Option<&str>, allow: Option<&str>) -> Result<Self, String> {
        let mut guard = Self::open();
        for item in list(deny.unwrap_or(DEFAULT_DENY)) {
            if item == "self" {
                guard.deny_self = true;
            } else if let Some((_, ranges)) = NAMED.iter().find(|(name, _)| *name == item) {
                for range in *ranges {
                    let net = range.parse().map_err(|e| format!("{range}: {e}"))?;
                    guard.deny.push((net, item.to_owned()));
                }
            } else {
                let net = net(item).ok_or_else(|| {
                    format!(
                        "FLOWCORE_HTTP_DENY: `{item}` is not a CIDR range, an address or one of \
                         loopback, link-local, private, unspecified, self"
                    )
                })?;
                guard.deny.push((net, item.to_owned()));
            }
        }
        for item in list(allow.unwrap_or_default()) {
            if let Some(net) = net(item) {
                guard.allow_nets.push(net);
            } else if let Some((host, port)) = host_port(item) {
                guard.allow_hosts.push((host, port));
            } else {
                return Err(format!(
                    "FLOWCORE_HTTP_ALLOW: `{item}` is not a CIDR range, an address or host:port"
                ));
            }
        }
        Ok(guard)
    }

    /// The same guard, with the addresses that `self` in the deny list stands for: the
    /// server's own (its listening address, the addresses of its interfaces).
    pub fn with_own_addresses(mut self, own: impl IntoIterator<Item = IpAddr>) -> Self {
        self.own.extend(own.into_iter().map(|ip| ip.to_canonical()));
        self
    }

    /// `Ok` when a connection to `ip` is allowed; otherwise why not, naming the variables.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        // `::ffff:127.0.0.1` is 127.0.0.1.
        let ip = ip.to_canonical();
        if self.allow_nets.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        // An IPv4 address inside an IPv6 one (NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) reaches
        // that IPv4 address through a translator: it is checked as well.
        if let IpAddr::V6(v6) = ip
            && let Some(v4) = embedded_ipv4(v6)
        {
            self.check_ip(IpAddr::V4(v4))?;
        }
        let why = if let Some((_, word)) = self.deny.iter().find(|(net, _)| net.contains(&ip)) {
            word.as_str()
        } else if self.deny_self && self.own.contains(&ip) {
            "self"
        } else {
            return Ok(());
        };
        Err(format!(
            "the address {ip} is denied (`{why}` in FLOWCORE_HTTP_DENY); to reach it, add it to \
             FLOWCORE_HTTP_ALLOW"
        ))
    }

    /// Checks a URL before a request or a redirect is made. A `host:port` of the allow list
    /// passes, and such a host is then reached on its listed ports only; an address in the URL
    /// is checked here; a name is checked when it is resolved ([`Guard::exempt`] tells
    /// whether its addresses are).
    pub fn check_url(&self, url: &url::Url) -> Result<(), String> {
        let port = url.port_or_known_default().unwrap_or(0);
        match url.host() {
            None => Err(format!("`{url}` has no host")),
            Some(url::Host::Ipv4(ip)) => self.check_host(&ip.to_string(), port, ip.into()),
            Some(url::Host::Ipv6(ip)) => self.check_host(&ip.to_string(), port, ip.into()),
            Some(url::Host::Domain(name)) => {
                let name = name.to_ascii_lowercase();
                let ports: Vec<u16> = self
                    .allow_hosts
                    .iter()
                    .filter(|(host, _)| *host == name)
                    .map(|(_, p)| *p)
                    .collect();
                if ports.is_empty() || ports.contains(&port) {
                    Ok(())
                } else {
                    Err(format!(
                        "`{name}` is in FLOWCORE_HTTP_ALLOW for port {} only, not {port}",
                        ports
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            }
        }
    }

    fn check_host(&self, host: &str, port: u16, ip: IpAddr) -> Result<(), String> {
        let named = self
            .allow_hosts
            .iter()
            .any(|(h, p)| *p == port && h.trim_start_matches('[').trim_end_matches(']') == host);
        if named { Ok(()) } else { self.check_ip(ip) }
    }

    /// Whether a host name is in the allow list (its addresses are not checked).
    pub fn exempt(&self, name: &str) -> bool {
        self.allow_hosts
            .iter()
            .any(|(host, _)| host.eq_ignore_ascii_case(name))
    }
}

fn embedded_ipv4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let o = v6.octets();
    match v6.segments() {
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some([o[12], o[13], o[14], o[15]].into()),
        [0x2002, ..] => Some([o[2], o[3], o[4], o[5]].into()),
        _ => None,
    }
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// A CIDR range or a single address.
fn net(item: &str) -> Option<IpNet> {
    item.parse::<IpNet>()
        .ok()
        .or_else(|| item.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|net| match net {
            // `::ffff:10.0.0.0/104` is 10.0.0.0/8.
            IpNet::V6(v6) if v6.addr().to_ipv4_mapped().is_some() && v6.prefix_len() >= 96 => {
                let v4 = v6
                    .addr()
                    .to_ipv4_mapped()
                    .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
                ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                    .map(IpNet::V4)
                    .unwrap_or(net)
            }
            other => other,
        })
}

/// `host:port` or `[v6]:port`, host lowercased.
fn host_port(item: &str) -> Option<(String, u16)> {
    let (host, port) = item.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.to_ascii_lowercase();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let valid = !bare.is_empty()
        && (bare.parse::<IpAddr>().is_ok()
            || bare
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'));
    valid.then(|| (bare.to_owned(), port))
}

/// The addresses of this machine that a connection from it could reach itself at, besides
/// loopback: the listening address, and the address of the interface that routes outwards
/// (found by connecting a UDP socket, which sends nothing). The standard library lists no
/// interfaces; this covers the server's usual public address.
pub fn own_addresses(listen: IpAddr) -> Vec<IpAddr> {
    let mut out = vec![listen];
    for probe in ["192.0.2.1:9", "[2001:db8::1]:9"] {
        let any: std::net::SocketAddr = if probe.starts_with('[') {
            "[::]:0".parse().expect("an address")
        } else {
            "0.0.0.0:0".parse().expect("an address")
        };
        if let Ok(socket) = std::net::UdpSocket::bind(any)
            && socket.connect(probe).is_ok()
            && let Ok(local) = socket.local_addr()
        {
            out.push(local.ip());
        }
    }
    out.retain(|ip| !ip.is_unspecified());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).unwrap()
    }

    #[test]
    fn the_default_denies_every_spelling_of_this_machine_and_its_networks() {
        let guard = Guard::default().with_own_addresses([ip("203.0.113.7")]);
        for denied in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "0.0.0.0",
            "::",
            "169.254.169.254",
            "fe80::1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "203.0.113.7",
            "100.100.100.200",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "64:ff9b::7f00:1",
            "2002:a9fe:a9fe::1",
            "ff02::1",
        ] {
            assert!(guard.check_ip(ip(denied)).is_err(), "{denied}");
        }
        assert!(guard.check_ip(ip("93.184.216.34")).is_ok());
        assert!(guard.check_ip(ip("2606:2800:220:1::")).is_ok());
        // The URL parser reads every IPv4 spelling as the address it means.
        for spelling in [
            "http://127.1/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://0.0.0.0:3000/metrics",
            "http://[::ffff:7f00:1]/",
            "http://[::1]:3000/api/v1/flows",
        ] {
            assert!(guard.check_url(&url(spelling)).is_err(), "{spelling}");
        }
        // A name is checked when it is resolved.
        assert!(guard.check_url(&url("http://localhost/")).is_ok());
        assert!(!guard.exempt("localhost"));
        let err = guard.check_ip(ip("127.0.0.1")).unwrap_err();
        assert!(
            err.contains("FLOWCORE_HTTP_ALLOW") && err.contains("loopback"),
            "{err}"
        );
    }

    #[test]
    fn allow_lets_ranges_and_host_ports_through() {
        let guard = Guard::parse(
            None,
            Some("10.0.0.0/8, ollama:11434, [::1]:8080, 127.0.0.1:9000"),
        )
        .unwrap();
        assert!(guard.check_ip(ip("10.9.9.9")).is_ok());
        assert!(guard.check_ip(ip("192.168.0.1")).is_err());
        assert!(guard.check_url(&url("http://ollama:11434/v1")).is_ok());
        assert!(guard.exempt("OLLAMA"));
        assert!(
            guard.check_url(&url("http://ollama:22/")).is_err(),
            "other ports"
        );
        assert!(guard.check_url(&url("http://[::1]:8080/")).is_ok());
        assert!(guard.check_url(&url("http://[::1]:8081/")).is_err());
        assert!(guard.check_url(&url("http://127.0.0.1:9000/")).is_ok());
        assert!(guard.check_url(&url("http://127.0.0.1:9001/")).is_err());
    }

    #[test]
    fn a_deny_value_replaces_the_default_and_bad_values_name_their_variable() {
        let guard = Guard::parse(Some("203.0.113.0/24"), None).unwrap();
        assert!(guard.check_ip(ip("127.0.0.1")).is_ok());
        assert!(guard.check_ip(ip("203.0.113.9")).is_err());
        let mapped = Guard::parse(Some("::ffff:10.0.0.0/104"), None).unwrap();
        assert!(mapped.check_ip(ip("10.2.3.4")).is_err());
        assert!(
            Guard::parse(Some("nowhere"), None)
                .unwrap_err()
                .starts_with("FLOWCORE_HTTP_DENY")
        );
        assert!(
            Guard::parse(None, Some("a b:1"))
                .unwrap_err()
                .starts_with("FLOWCORE_HTTP_ALLOW")
        );
        assert!(Guard::open().check_ip(ip("127.0.0.1")).is_ok());
    }
}
