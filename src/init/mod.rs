//! `stepmesh init`: iptables rules of transparent interception, installed in
//! the pod's network namespace by the injected init container.

pub mod non_tcp;
pub mod rules;

use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use clap::Args;

pub use crate::cidr::Cidr;
pub use non_tcp::NonTcp;
pub use rules::{Family, RuleConfig};

/// Where `--non-tcp dns` finds the pod's nameservers by default: kubelet
/// mounts the pod's resolv.conf in every container, the init one included.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Flags of `stepmesh init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// UID the sidecar runs as: its traffic is never redirected.
    #[arg(long, default_value_t = 1337, env = "STEPMESH_PROXY_UID")]
    pub proxy_uid: u32,
    /// Port inbound TCP is redirected to.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// Port outbound TCP is redirected to.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// The sidecar's admin port, never redirected inbound.
    #[arg(long, default_value_t = 15020)]
    pub admin_port: u16,
    /// Inbound destination ports not redirected (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports not redirected (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination networks not redirected (comma-separated IPv4 or IPv6 CIDRs).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// What the pod may send and receive that is not TCP (UDP, SCTP, ICMP:
    /// the sidecar cannot carry it): `allow` all of it, `dns` only DNS
    /// queries over UDP to the pod's nameservers and their answers, `drop`
    /// all of it. The sidecar's UID is exempt, as from interception.
    #[arg(long, value_enum, default_value_t = NonTcp::Allow)]
    pub non_tcp: NonTcp,
    /// Nameservers `--non-tcp dns` lets queries out to (comma-separated;
    /// default: the `nameserver` lines of /etc/resolv.conf).
    #[arg(long, value_delimiter = ',')]
    pub dns_servers: Option<Vec<IpAddr>>,
    /// UDP destination ports `--non-tcp dns` and `drop` still let out, to
    /// any host (comma-separated): a StatsD or tracing agent on the node.
    #[arg(long, value_delimiter = ',')]
    pub allow_udp_ports: Vec<u16>,
    /// Print the rules (iptables-restore format) instead of installing them.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove our rules and chains instead of installing them.
    #[arg(long)]
    pub cleanup: bool,
}

/// Why installing or removing the rules failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The iptables tool could not be started.
    #[error("running {tool}: {cause} (is iptables installed?)")]
    Spawn {
        /// The program.
        tool: &'static str,
        /// What the OS said.
        cause: std::io::Error,
    },
    /// The iptables tool ran and refused.
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        /// The program.
        tool: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
}

impl InitArgs {
    /// The rule configuration these flags describe; with `--non-tcp dns`
    /// and no `--dns-servers`, the nameservers are read from
    /// /etc/resolv.conf (none there: no DNS server to let queries out to,
    /// and glibc's resolver would ask only loopback; no file: the same,
    /// with a warning).
    pub fn rule_config(&self) -> RuleConfig {
        let dns_servers = match (&self.dns_servers, self.non_tcp) {
            (Some(servers), _) => servers.clone(),
            (None, NonTcp::Dns) => match std::fs::read_to_string(RESOLV_CONF) {
                Ok(text) => non_tcp::nameservers(&text),
                Err(e) => {
                    tracing::warn!(
                        "reading {RESOLV_CONF}: {e}: no nameserver, so no DNS over UDP \
                         (--dns-servers names them)"
                    );
                    Vec::new()
                }
            },
            (None, _) => Vec::new(),
        };
        RuleConfig {
            proxy_uid: self.proxy_uid,
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            admin_port: self.admin_port,
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone(),
            non_tcp: self.non_tcp,
            dns_servers,
            allow_udp_ports: self.allow_udp_ports.clone(),
        }
    }
}

/// Installs, prints or removes the rules: IPv4 always, IPv6 too when
/// `ip6tables-restore` is present (a pod's IPv6 traffic must not bypass the
/// sidecar; without the tool there is nothing to bypass through it, and that
/// is logged). Each family's nat and filter rules go in one restore input.
pub fn run(args: InitArgs) -> anyhow::Result<()> {
    let config = args.rule_config();
    if args.dry_run && !args.cleanup {
        print!("{}", fresh(&config, Family::V4));
        println!("# IPv6 (ip6tables-restore)");
        print!("{}", fresh(&config, Family::V6));
        return Ok(());
    }
    for family in [Family::V4, Family::V6] {
        if family == Family::V6 && !std::path::Path::new("/proc/net/if_inet6").exists() {
            // IPv6 disabled in this kernel: no IPv6 traffic to intercept.
            tracing::info!("IPv6 is disabled in the kernel; IPv4 rules only");
            continue;
        }
        let tools = Tools::of(family);
        let (nat, filter) =
            match save(tools, "nat").and_then(|nat| Ok((nat, save(tools, "filter")?))) {
                Ok(tables) => tables,
                Err(InitError::Spawn { cause, .. })
                    if family == Family::V6 && cause.kind() == std::io::ErrorKind::NotFound =>
                {
                    tracing::warn!("ip6tables-restore not found: IPv6 traffic is not intercepted");
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
        if args.cleanup {
            let input: String = [
                rules::cleanup(&nat),
                rules::cleanup_of("filter", &non_tcp::CHAINS, &filter),
            ]
            .into_iter()
            .flatten()
            .collect();
            match (args.dry_run, input.is_empty()) {
                (true, true) => println!("# {}: nothing to remove", tools.restore),
                (true, false) => print!("# {}\n{input}", tools.restore),
                (false, true) => {}
                (false, false) => restore(tools, &input)?,
            }
            if !args.dry_run {
                tracing::info!(?family, "interception rules removed");
            }
            continue;
        }
        let mut input = rules::install_over(&config, family, &nat);
        input.extend(non_tcp::filter_over(&config, family, &filter));
        restore(tools, &input)?;
        tracing::info!(?family, ?config, "interception rules installed");
    }
    Ok(())
}

/// A family's whole rule set over empty tables, for `--dry-run`.
fn fresh(config: &RuleConfig, family: Family) -> String {
    let mut input = rules::install(config, family);
    input.extend(non_tcp::filter_over(config, family, ""));
    input
}

/// The save/restore programs of one family.
#[derive(Debug, Clone, Copy)]
struct Tools {
    save: &'static str,
    restore: &'static str,
}

impl Tools {
    fn of(family: Family) -> Self {
        match family {
            Family::V4 => Self {
                save: "iptables-save",
                restore: "iptables-restore",
            },
            Family::V6 => Self {
                save: "ip6tables-save",
                restore: "ip6tables-restore",
            },
        }
    }
}

/// The current `table`, as `iptables-save -t table` prints it.
fn save(tools: Tools, table: &str) -> Result<String, InitError> {
    let tool = tools.save;
    let out = Command::new(tool)
        .args(["-t", table])
        .stdin(Stdio::null())
        .output()
        .map_err(|cause| InitError::Spawn { tool, cause })?;
    succeeded(tool, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies `input` in one atomic transaction, leaving other rules alone.
fn restore(tools: Tools, input: &str) -> Result<(), InitError> {
    let tool = tools.restore;
    let mut child = Command::new(tool)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|cause| InitError::Spawn { tool, cause })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|cause| InitError::Spawn { tool, cause })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|cause| InitError::Spawn { tool, cause })?;
    succeeded(tool, &out)
}

/// A finished tool's exit status as a result: its stderr when it failed.
fn succeeded(tool: &'static str, out: &std::process::Output) -> Result<(), InitError> {
    if out.status.success() {
        return Ok(());
    }
    Err(InitError::Failed {
        tool,
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}
