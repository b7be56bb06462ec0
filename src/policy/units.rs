//! Small value parsers of the policy file: durations (`300s`, `5m`) and CIDRs.

use std::net::IpAddr;
use std::time::Duration;

/// Parses `500ms`, `30s`, `5m`, `1h` (a whole number and one unit).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 30s, 5m or 1h"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("{s:?} is not a duration like 500ms, 30s, 5m or 1h")),
    };
    Ok(Duration::from_secs(secs))
}

/// An IPv4 or IPv6 network, `10.96.0.0/12` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// Parses `addr/len`; host bits must be zero so the rule means what it says.
    pub(crate) fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (addr/len)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an IP address"))?;
        let len: u8 = len
            .parse()
            .map_err(|_| format!("{s:?}: prefix length {len:?} is not a number"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("{s:?}: prefix length {len} is over {max}"));
        }
        let cidr = Cidr { addr, len };
        if bits(addr) & !cidr.mask() != 0 {
            return Err(format!("{s:?} has host bits set"));
        }
        Ok(cidr)
    }

    fn mask(&self) -> u128 {
        let width: u32 = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.len == 0 {
            0
        } else {
            let ones = u128::MAX << (128 - u32::from(self.len));
            ones >> (128 - width)
        }
    }

    /// Whether `ip` is inside (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        bits(ip) & self.mask() == bits(self.addr)
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
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "s", "5", "5 m", "-5s", "5d", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.96.0.0/12").unwrap();
        assert!(c.contains("10.96.0.10".parse().unwrap()));
        assert!(c.contains("10.111.255.255".parse().unwrap()));
        assert!(!c.contains("10.112.0.0".parse().unwrap()));
        assert!(c.contains("::ffff:10.96.0.1".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.1/8").unwrap_err().contains("host bits"));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("10.0.0.0").is_err());
        assert!(Cidr::parse("x/8").is_err());
        assert!(Cidr::parse("::/0")
            .unwrap()
            .contains("2001:db8::1".parse().unwrap()));
        assert!(Cidr::parse("1.2.3.4/32")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
    }
}
