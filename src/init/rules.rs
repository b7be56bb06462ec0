//! The interception rule set as text for `iptables-restore --noflush`: a pure
//! function of the configuration and of what `iptables-save` shows now.

use std::fmt::Write as _;

use super::non_tcp::NonTcp;
use crate::cidr::Cidr;

/// Chain that decides which inbound TCP goes to the sidecar.
pub const INBOUND: &str = "STEPMESH_INBOUND";
/// Chain that redirects inbound TCP to the sidecar's inbound port.
pub const REDIRECT_IN: &str = "STEPMESH_REDIRECT_IN";
/// Chain that decides which outbound TCP goes to the sidecar.
pub const OUTPUT: &str = "STEPMESH_OUTPUT";
/// Chain that redirects outbound TCP to the sidecar's outbound port.
pub const REDIRECT_OUT: &str = "STEPMESH_REDIRECT_OUT";
/// Our chains, in the order they are declared.
pub const CHAINS: [&str; 4] = [INBOUND, REDIRECT_IN, OUTPUT, REDIRECT_OUT];

/// The jumps from the built-in chains into ours: `(built-in chain, rule spec)`.
const JUMPS: [(&str, &str); 2] = [
    ("PREROUTING", "-p tcp -j STEPMESH_INBOUND"),
    ("OUTPUT", "-p tcp -j STEPMESH_OUTPUT"),
];

/// Everything the rule set depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleConfig {
    /// UID of the sidecar: its own traffic is never redirected.
    pub proxy_uid: u32,
    /// Where inbound TCP is redirected.
    pub inbound_port: u16,
    /// Where outbound TCP is redirected.
    pub outbound_port: u16,
    /// The sidecar's admin port: never redirected inbound (kubelet probes it).
    pub admin_port: u16,
    /// Inbound destination ports left alone.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination networks left alone (by the non-TCP rules too).
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// What the pod's non-TCP traffic may do (`non_tcp.rs`).
    pub non_tcp: NonTcp,
    /// The nameservers `NonTcp::Dns` lets queries out to.
    pub dns_servers: Vec<std::net::IpAddr>,
    /// UDP destination ports let out, to any host, whatever `non_tcp` says.
    pub allow_udp_ports: Vec<u16>,
}

impl Default for RuleConfig {
    fn default() -> Self {
        Self {
            proxy_uid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            admin_port: 15020,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            non_tcp: NonTcp::Allow,
            dns_servers: Vec::new(),
            allow_udp_ports: Vec::new(),
        }
    }
}

/// The IP family a rule set is for: `iptables` or `ip6tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 (`iptables-restore`).
    V4,
    /// IPv6 (`ip6tables-restore`).
    V6,
}

impl Family {
    /// The loopback network of this family.
    fn loopback(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.0/8",
            Self::V6 => "::1/128",
        }
    }
}

impl Family {
    /// The family whose rules `cidr` belongs in.
    pub fn of(cidr: &Cidr) -> Family {
        if cidr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

/// The whole rule set of one family, for `--dry-run` and a first install.
pub fn install(config: &RuleConfig, family: Family) -> String {
    install_over(config, family, "")
}

/// The `iptables-restore --noflush` (or `ip6tables-restore`) input that
/// (re)builds our chains over the current nat table `existing` (`-save -t
/// nat` output). Declaring a chain flushes it, so applying twice yields the
/// same rules; a jump already present is not added again. CIDRs of the other
/// family are left to the other table.
pub fn install_over(config: &RuleConfig, family: Family, existing: &str) -> String {
    let mut out = String::from("*nat\n");
    for chain in CHAINS {
        // writeln! into a String cannot fail.
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    let mut rule = |chain: &str, spec: &str| {
        let _ = writeln!(out, "-A {chain} {spec}");
    };
    rule(
        REDIRECT_IN,
        &format!("-p tcp -j REDIRECT --to-ports {}", config.inbound_port),
    );
    rule(
        REDIRECT_OUT,
        &format!("-p tcp -j REDIRECT --to-ports {}", config.outbound_port),
    );

    // Inbound: the admin port always, then the operator's exclusions.
    let mut inbound_excluded = vec![config.admin_port];
    inbound_excluded.extend(&config.exclude_inbound_ports);
    for port in dedup(inbound_excluded) {
        rule(INBOUND, &format!("-p tcp --dport {port} -j RETURN"));
    }
    rule(INBOUND, &format!("-p tcp -j {REDIRECT_IN}"));

    // Outbound: the sidecar's own traffic, loopback, then exclusions.
    rule(
        OUTPUT,
        &format!("-m owner --uid-owner {} -j RETURN", config.proxy_uid),
    );
    rule(OUTPUT, "-o lo -j RETURN");
    rule(OUTPUT, &format!("-d {} -j RETURN", family.loopback()));
    for port in dedup(config.exclude_outbound_ports.clone()) {
        rule(OUTPUT, &format!("-p tcp --dport {port} -j RETURN"));
    }
    for cidr in config
        .exclude_outbound_cidrs
        .iter()
        .filter(|c| Family::of(c) == family)
    {
        rule(OUTPUT, &format!("-d {cidr} -j RETURN"));
    }
    rule(OUTPUT, &format!("-p tcp -j {REDIRECT_OUT}"));

    let present = jumps_present(existing, &CHAINS);
    for (chain, spec) in JUMPS {
        if !present.iter().any(|(c, s)| *c == chain && *s == spec) {
            rule(chain, spec);
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// The input that removes every trace of ours from `existing` (the nat
/// table), or `None` when there is nothing to remove.
pub fn cleanup(existing: &str) -> Option<String> {
    cleanup_of("nat", &CHAINS, existing)
}

/// The input that removes `chains` and every jump into them from `existing`,
/// the `-save -t table` output of `table`, or `None` when none is there.
pub(super) fn cleanup_of(table: &str, chains: &[&str], existing: &str) -> Option<String> {
    let mut out = format!("*{table}\n");
    let mut any = false;
    for (chain, spec) in jumps_present(existing, chains) {
        let _ = writeln!(out, "-D {chain} {spec}");
        any = true;
    }
    let ours: Vec<&str> = chains
        .iter()
        .copied()
        .filter(|c| existing.lines().any(|l| l.starts_with(&format!(":{c} "))))
        .collect();
    // Flush all before deleting any: our chains jump into each other.
    for chain in &ours {
        let _ = writeln!(out, "-F {chain}");
    }
    for chain in &ours {
        let _ = writeln!(out, "-X {chain}");
    }
    any |= !ours.is_empty();
    out.push_str("COMMIT\n");
    any.then_some(out)
}

/// Rules in built-in chains that jump to one of `chains`, as `(chain, spec)`.
pub(super) fn jumps_present<'a>(existing: &'a str, chains: &[&str]) -> Vec<(&'a str, &'a str)> {
    existing
        .lines()
        .filter_map(|l| l.strip_prefix("-A "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(chain, spec)| {
            !chains.contains(chain) && spec.split_whitespace().any(|word| chains.contains(&word))
        })
        .collect()
}

pub(super) fn dedup(mut ports: Vec<u16>) -> Vec<u16> {
    let mut seen = Vec::with_capacity(ports.len());
    ports.retain(|p| {
        let new = !seen.contains(p);
        seen.push(*p);
        new
    });
    ports
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config() -> RuleConfig {
        RuleConfig {
            exclude_inbound_ports: vec![9090, 15020],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00:10::/108".parse().unwrap(),
            ],
            ..RuleConfig::default()
        }
    }

    #[test]
    fn install_has_chains_exclusions_and_jumps() {
        let rules = install(&config(), Family::V4);
        let expected = "*nat
:STEPMESH_INBOUND - [0:0]
:STEPMESH_REDIRECT_IN - [0:0]
:STEPMESH_OUTPUT - [0:0]
:STEPMESH_REDIRECT_OUT - [0:0]
-A STEPMESH_REDIRECT_IN -p tcp -j REDIRECT --to-ports 15006
-A STEPMESH_REDIRECT_OUT -p tcp -j REDIRECT --to-ports 15001
-A STEPMESH_INBOUND -p tcp --dport 15020 -j RETURN
-A STEPMESH_INBOUND -p tcp --dport 9090 -j RETURN
-A STEPMESH_INBOUND -p tcp -j STEPMESH_REDIRECT_IN
-A STEPMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A STEPMESH_OUTPUT -o lo -j RETURN
-A STEPMESH_OUTPUT -d 127.0.0.0/8 -j RETURN
-A STEPMESH_OUTPUT -p tcp --dport 5432 -j RETURN
-A STEPMESH_OUTPUT -d 10.96.0.0/12 -j RETURN
-A STEPMESH_OUTPUT -p tcp -j STEPMESH_REDIRECT_OUT
-A PREROUTING -p tcp -j STEPMESH_INBOUND
-A OUTPUT -p tcp -j STEPMESH_OUTPUT
COMMIT
";
        assert_eq!(rules, expected);
        let v6 = install(&config(), Family::V6);
        assert!(
            v6.contains("-A STEPMESH_OUTPUT -d ::1/128 -j RETURN\n"),
            "{v6}"
        );
        assert!(
            v6.contains("-A STEPMESH_OUTPUT -d fd00:10::/108 -j RETURN\n"),
            "{v6}"
        );
        assert!(
            !v6.contains("10.96.0.0/12") && !v6.contains("127.0.0.0/8"),
            "{v6}"
        );
        assert!(v6.contains("-A STEPMESH_INBOUND -p tcp --dport 9090 -j RETURN\n"));
    }

    #[test]
    fn jumps_are_not_added_twice() {
        let existing = "*nat\n:PREROUTING ACCEPT [0:0]\n:STEPMESH_INBOUND - [0:0]\n\
                        -A PREROUTING -p tcp -j STEPMESH_INBOUND\n\
                        -A OUTPUT -p tcp -j STEPMESH_OUTPUT\nCOMMIT\n";
        let rules = install_over(&config(), Family::V4, existing);
        assert!(!rules.contains("-A PREROUTING"), "{rules}");
        assert!(!rules.contains("-A OUTPUT "), "{rules}");
        assert!(rules.contains(":STEPMESH_INBOUND - [0:0]"));
    }

    #[test]
    fn cleanup_removes_jumps_then_chains() {
        let existing = install(&config(), Family::V4);
        let undo = cleanup(&existing).unwrap();
        assert!(undo.contains("-D PREROUTING -p tcp -j STEPMESH_INBOUND\n"));
        assert!(undo.contains("-D OUTPUT -p tcp -j STEPMESH_OUTPUT\n"));
        let flush = undo.find("-F STEPMESH_REDIRECT_OUT").unwrap();
        let delete = undo.find("-X STEPMESH_INBOUND").unwrap();
        assert!(
            flush < delete,
            "every chain is flushed before any is deleted"
        );
        assert_eq!(cleanup("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"), None);
    }

    #[test]
    fn foreign_rules_are_left_alone() {
        let existing = "-A PREROUTING -p tcp -j KUBE-SERVICES\n-A OUTPUT -j DOCKER_OUTPUT\n";
        assert_eq!(cleanup(existing), None);
    }

    #[test]
    fn cidrs_go_to_their_family() {
        assert_eq!(Family::of(&"fd00::/8".parse().unwrap()), Family::V6);
        assert_eq!(Family::of(&"10.0.0.0/8".parse().unwrap()), Family::V4);
    }
}
