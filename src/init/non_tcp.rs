//! What a pod may send and receive that is not TCP. The nat rules
//! (`rules.rs`) can only send TCP through the sidecar; UDP, SCTP and ICMP
//! would pass beside it, unauthenticated and unauthorized. `--non-tcp`
//! decides what of it passes, with filter-table rules built, like the nat
//! ones, by a pure function of the configuration and of what
//! `iptables-save -t filter` shows now.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::rules::{cleanup_of, dedup, jumps_present, Family, RuleConfig};
use crate::cidr::Cidr;

/// What happens to the pod's traffic that is not TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonTcp {
    /// Everything passes beside the sidecar (no filter rules).
    #[default]
    Allow,
    /// Only DNS queries over UDP to the pod's nameservers, and their answers.
    Dns,
    /// Nothing but what IP itself needs (ICMP errors about allowed flows,
    /// IPv6 neighbour discovery).
    Drop,
}

impl NonTcp {
    /// The value as the `--non-tcp` flag and the annotation spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Dns => "dns",
            Self::Drop => "drop",
        }
    }
}

/// Chain that decides which inbound non-TCP traffic is accepted.
pub const NONTCP_IN: &str = "STEPMESH_NONTCP_IN";
/// Chain that decides which outbound non-TCP traffic is sent.
pub const NONTCP_OUT: &str = "STEPMESH_NONTCP_OUT";
/// Our filter-table chains.
pub const CHAINS: [&str; 2] = [NONTCP_IN, NONTCP_OUT];

/// The jumps into our chains, inserted first so no earlier `ACCEPT` in the
/// pod's table can get around them.
const JUMPS: [(&str, &str); 2] = [
    ("INPUT", "-j STEPMESH_NONTCP_IN"),
    ("OUTPUT", "-j STEPMESH_NONTCP_OUT"),
];

/// ICMPv6 that IPv6 cannot work without, with the hop limit that keeps it
/// on the link (RFC 4861 §7.1.1, RFC 3810 §5): router solicitation and
/// advertisement, neighbour solicitation and advertisement (133-136, hop
/// limit 255: never forwarded), and multicast listener queries and reports
/// (130-132, 143, hop limit 1) that bridges with snooping forward neighbour
/// discovery by. Conntrack does not track them, so they are not "related"
/// to anything; the hop limit keeps them from being a way to or from any
/// host beyond the link.
const IPV6_LINK_ICMP: [(u8, u8); 8] = [
    (130, 1),
    (131, 1),
    (132, 1),
    (133, 255),
    (134, 255),
    (135, 255),
    (136, 255),
    (143, 1),
];

/// The `iptables-restore --noflush` input (filter table) that makes the
/// pod's non-TCP traffic what `config.non_tcp` says over the current filter
/// table `existing`; `None` when there is nothing to do (`allow` with none
/// of our chains present). `allow` removes our chains and jumps; the other
/// modes (re)declare the chains, which flushes them, so applying twice
/// yields the same rules.
pub fn filter_over(config: &RuleConfig, family: Family, existing: &str) -> Option<String> {
    if config.non_tcp == NonTcp::Allow {
        return cleanup_of("filter", &CHAINS, existing);
    }
    let mut out = String::from("*filter\n");
    for chain in CHAINS {
        // writeln! into a String cannot fail.
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    let mut rule = |chain: &str, spec: &str| {
        let _ = writeln!(out, "-A {chain} {spec}");
    };
    // Both directions: TCP is the nat rules' (through the sidecar); then
    // loopback, answers to what was let out and ICMP errors about it, and
    // what IPv6 itself needs.
    for (chain, interface) in [(NONTCP_IN, "-i lo"), (NONTCP_OUT, "-o lo")] {
        rule(chain, "-p tcp -j RETURN");
        rule(chain, &format!("{interface} -j RETURN"));
        rule(
            chain,
            "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        );
        if family == Family::V6 {
            for (kind, hops) in IPV6_LINK_ICMP {
                rule(
                    chain,
                    &format!(
                        "-p ipv6-icmp -m icmp6 --icmpv6-type {kind} -m hl --hl-eq {hops} -j RETURN"
                    ),
                );
            }
        }
    }
    rule(NONTCP_IN, "-j DROP");

    // Outbound: the sidecar's own (it is exempt from interception too; it
    // resolves the CA's name), DNS to the nameservers, the UDP ports
    // allowed (a StatsD or tracing agent), the networks the operator left
    // outside the mesh; nothing else.
    rule(
        NONTCP_OUT,
        &format!("-m owner --uid-owner {} -j RETURN", config.proxy_uid),
    );
    if config.non_tcp == NonTcp::Dns {
        for server in config
            .dns_servers
            .iter()
            .map(|ip| Cidr::from(*ip))
            .filter(|host| Family::of(host) == family)
        {
            rule(
                NONTCP_OUT,
                &format!("-d {server} -p udp -m udp --dport 53 -j RETURN"),
            );
        }
    }
    for port in dedup(config.allow_udp_ports.clone()) {
        rule(
            NONTCP_OUT,
            &format!("-p udp -m udp --dport {port} -j RETURN"),
        );
    }
    for cidr in config
        .exclude_outbound_cidrs
        .iter()
        .filter(|c| Family::of(c) == family)
    {
        rule(NONTCP_OUT, &format!("-d {cidr} -j RETURN"));
    }
    rule(NONTCP_OUT, "-j DROP");

    // Taken out and put back first each time: a rule inserted above ours
    // since the last run (by the app, with NET_ADMIN it lacks, or by a CNI)
    // does not stay ahead of them.
    for (chain, spec) in jumps_present(existing, &CHAINS) {
        let _ = writeln!(out, "-D {chain} {spec}");
    }
    for (chain, spec) in JUMPS {
        let _ = writeln!(out, "-I {chain} 1 {spec}");
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// The nameservers of a resolv.conf (`nameserver ADDR` lines; a zone after
/// `%` is dropped, unparsable entries are skipped as the resolver skips
/// them).
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|addr| addr.split('%').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config(non_tcp: NonTcp) -> RuleConfig {
        RuleConfig {
            non_tcp,
            dns_servers: vec!["10.96.0.10".parse().unwrap(), "fd00::a".parse().unwrap()],
            exclude_outbound_cidrs: vec!["192.168.0.0/16".parse().unwrap()],
            ..RuleConfig::default()
        }
    }

    #[test]
    fn dns_lets_out_queries_to_the_nameservers_only() {
        let rules = filter_over(&config(NonTcp::Dns), Family::V4, "").unwrap();
        let expected = "*filter
:STEPMESH_NONTCP_IN - [0:0]
:STEPMESH_NONTCP_OUT - [0:0]
-A STEPMESH_NONTCP_IN -p tcp -j RETURN
-A STEPMESH_NONTCP_IN -i lo -j RETURN
-A STEPMESH_NONTCP_IN -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A STEPMESH_NONTCP_OUT -p tcp -j RETURN
-A STEPMESH_NONTCP_OUT -o lo -j RETURN
-A STEPMESH_NONTCP_OUT -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A STEPMESH_NONTCP_IN -j DROP
-A STEPMESH_NONTCP_OUT -m owner --uid-owner 1337 -j RETURN
-A STEPMESH_NONTCP_OUT -d 10.96.0.10/32 -p udp -m udp --dport 53 -j RETURN
-A STEPMESH_NONTCP_OUT -d 192.168.0.0/16 -j RETURN
-A STEPMESH_NONTCP_OUT -j DROP
-I INPUT 1 -j STEPMESH_NONTCP_IN
-I OUTPUT 1 -j STEPMESH_NONTCP_OUT
COMMIT
";
        assert_eq!(rules, expected);
        let v6 = filter_over(&config(NonTcp::Dns), Family::V6, "").unwrap();
        assert!(
            v6.contains("-d fd00::a/128 -p udp -m udp --dport 53 -j RETURN\n"),
            "{v6}"
        );
        assert!(
            !v6.contains("10.96.0.10") && !v6.contains("192.168."),
            "{v6}"
        );
        for chain in CHAINS {
            let neighbour = format!(
                "-A {chain} -p ipv6-icmp -m icmp6 --icmpv6-type 135 -m hl --hl-eq 255 -j RETURN\n"
            );
            assert!(v6.contains(&neighbour), "{v6}");
        }
    }

    #[test]
    fn allowed_udp_ports_go_out_to_any_host_in_either_mode() {
        for mode in [NonTcp::Dns, NonTcp::Drop] {
            let config = RuleConfig {
                allow_udp_ports: vec![8125, 6831, 8125],
                ..config(mode)
            };
            let rules = filter_over(&config, Family::V6, "").unwrap();
            assert!(rules.contains("-A STEPMESH_NONTCP_OUT -p udp -m udp --dport 8125 -j RETURN\n-A STEPMESH_NONTCP_OUT -p udp -m udp --dport 6831 -j RETURN\n-A STEPMESH_NONTCP_OUT -j DROP"), "{rules}");
            assert_eq!(rules.matches("--dport 8125").count(), 1);
        }
    }

    #[test]
    fn drop_lets_no_dns_out() {
        let rules = filter_over(&config(NonTcp::Drop), Family::V4, "").unwrap();
        assert!(!rules.contains("--dport 53"), "{rules}");
        assert!(rules.ends_with("-A STEPMESH_NONTCP_OUT -j DROP\n-I INPUT 1 -j STEPMESH_NONTCP_IN\n-I OUTPUT 1 -j STEPMESH_NONTCP_OUT\nCOMMIT\n"), "{rules}");
    }

    #[test]
    fn jumps_are_put_back_first_and_allow_removes_them() {
        let existing = "*filter\n:INPUT ACCEPT [0:0]\n:STEPMESH_NONTCP_IN - [0:0]\n\
                        :STEPMESH_NONTCP_OUT - [0:0]\n-A INPUT -j STEPMESH_NONTCP_IN\n\
                        -A OUTPUT -j STEPMESH_NONTCP_OUT\nCOMMIT\n";
        let again = filter_over(&config(NonTcp::Drop), Family::V4, existing).unwrap();
        let moved = "-D INPUT -j STEPMESH_NONTCP_IN\n-D OUTPUT -j STEPMESH_NONTCP_OUT\n\
                     -I INPUT 1 -j STEPMESH_NONTCP_IN\n-I OUTPUT 1 -j STEPMESH_NONTCP_OUT\n";
        assert!(again.ends_with(&format!("{moved}COMMIT\n")), "{again}");
        let undo = filter_over(&config(NonTcp::Allow), Family::V4, existing).unwrap();
        assert!(undo.contains("-D INPUT -j STEPMESH_NONTCP_IN\n"), "{undo}");
        assert!(undo.contains("-X STEPMESH_NONTCP_OUT\n"), "{undo}");
        assert_eq!(
            filter_over(&config(NonTcp::Allow), Family::V4, "*filter\nCOMMIT\n"),
            None
        );
    }

    #[test]
    fn nameservers_are_read_as_the_resolver_reads_them() {
        let conf = "# generated\nsearch default.svc.cluster.local\nnameserver 10.96.0.10\n\
                    nameserver fe80::1%eth0\n  nameserver   169.254.20.10  \nnameserver bogus\n\
                    ;nameserver 1.1.1.1\noptions ndots:5\n";
        let found: Vec<String> = nameservers(conf).iter().map(ToString::to_string).collect();
        assert_eq!(found, ["10.96.0.10", "fe80::1", "169.254.20.10"]);
    }
}
