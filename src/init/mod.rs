//! `stepmesh init`: iptables rules of transparent interception, installed in
//! the pod's network namespace by the injected init container.

pub mod rules;

use std::io::Write as _;
use std::process::{Command, Stdio};

use clap::Args;

pub use rules::{Cidr, RuleConfig};

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
    /// Outbound destination IPv4 networks not redirected (comma-separated CIDRs).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<Cidr>,
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
    #[error("running {tool}: {source} (is iptables installed?)")]
    Spawn {
        /// The program.
        tool: &'static str,
        /// What the OS said.
        source: std::io::Error,
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
    /// The rule configuration these flags describe.
    pub fn rule_config(&self) -> RuleConfig {
        RuleConfig {
            proxy_uid: self.proxy_uid,
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            admin_port: self.admin_port,
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone(),
        }
    }
}

/// Installs, prints or removes the rules.
pub fn run(args: InitArgs) -> anyhow::Result<()> {
    let config = args.rule_config();
    match (args.dry_run, args.cleanup) {
        (true, false) => print!("{}", rules::install(&config)),
        (true, true) => match rules::cleanup(&save()?) {
            Some(input) => print!("{input}"),
            None => println!("# nothing to remove"),
        },
        (false, true) => {
            if let Some(input) = rules::cleanup(&save()?) {
                restore(&input)?;
            }
            tracing::info!("interception rules removed");
        }
        (false, false) => {
            restore(&rules::install_over(&config, &save()?))?;
            tracing::info!(?config, "interception rules installed");
        }
    }
    Ok(())
}

/// The current nat table, as `iptables-save -t nat` prints it.
fn save() -> Result<String, InitError> {
    let tool = "iptables-save";
    let out = Command::new(tool)
        .args(["-t", "nat"])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| InitError::Spawn { tool, source })?;
    if !out.status.success() {
        return Err(InitError::Failed {
            tool,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies `input` in one atomic transaction, leaving other rules alone.
fn restore(input: &str) -> Result<(), InitError> {
    let tool = "iptables-restore";
    let mut child = Command::new(tool)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| InitError::Spawn { tool, source })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|source| InitError::Spawn { tool, source })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| InitError::Spawn { tool, source })?;
    if !out.status.success() {
        return Err(InitError::Failed {
            tool,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}
