//! IP networks (`10.96.0.0/12`, `fd00::/8`) as policy rules and iptables
//! exclusions name them: one parser, so both agree on what a CIDR means.

use std::net::IpAddr;
use std::str::FromStr;

/// An IPv4 or IPv6 network `addr/len`; a bare address is a host (`/32`,
/// `/128`). Host bits must be zero: a rule must mean what it says, and
/// iptables would otherwise silently widen or narrow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// Whether this is an IPv4 network (else IPv6).
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `ip` is inside (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && bits(ip) & self.mask() == bits(self.addr)
    }

    /// Whether every address of `other` is inside (same family, at least
    /// as long a prefix).
    pub fn covers(&self, other: &Cidr) -> bool {
        other.is_ipv4() == self.is_ipv4() && other.len >= self.len && self.contains(other.addr)
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    fn width(&self) -> u8 {
        if self.addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    /// The network bits of an address of this family.
    fn mask(&self) -> u128 {
        let host_bits = u32::from(self.width() - self.len);
        let host = if host_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        let family = if self.addr.is_ipv4() {
            u128::from(u32::MAX)
        } else {
            u128::MAX
        };
        family & !host
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("CIDR {s:?}: {addr:?} is not an IP address"))?;
        let width: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = match len {
            None => width,
            Some(len) => len
                .parse()
                .ok()
                .filter(|l| *l <= width)
                .ok_or_else(|| format!("CIDR {s:?}: prefix length must be 0..={width}"))?,
        };
        let cidr = Self { addr, len };
        if bits(addr) & !cidr.mask() != 0 {
            return Err(format!("CIDR {s:?}: host bits are set"));
        }
        Ok(cidr)
    }
}

impl From<IpAddr> for Cidr {
    /// The host `addr` alone (`/32`, `/128`).
    fn from(addr: IpAddr) -> Self {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, len }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_networks_and_hosts() {
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("1.2.3.4").to_string(), "1.2.3.4/32");
        assert_eq!(cidr("fd00::/8").to_string(), "fd00::/8");
        assert_eq!(cidr("::/0").to_string(), "::/0");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert!(!cidr("fd00::/8").is_ipv4());
        for (bad, why) in [
            ("10.0.0.1/8", "host bits"),
            ("fd00::1/8", "host bits"),
            ("10.0.0.0/33", "prefix length"),
            ("::/129", "prefix length"),
            ("10.0.0/8", "not an IP address"),
            ("", "not an IP address"),
        ] {
            let err = bad.parse::<Cidr>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn containment() {
        let c = cidr("10.96.0.0/12");
        assert!(c.contains("10.96.0.10".parse().unwrap()));
        assert!(c.contains("10.111.255.255".parse().unwrap()));
        assert!(!c.contains("10.112.0.0".parse().unwrap()));
        assert!(c.contains("::ffff:10.96.0.1".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        let all = cidr("0.0.0.0/0");
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
        let v6 = cidr("fd00::/8");
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!(cidr("::/0").contains("fe80::1".parse().unwrap()));
        assert!(cidr("1.2.3.4").contains("1.2.3.4".parse().unwrap()));
        assert!(!cidr("1.2.3.4").contains("1.2.3.5".parse().unwrap()));
    }
}
