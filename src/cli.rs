//! The command line: one binary, one subcommand per part of the mesh.
//! Each subcommand's arguments live beside the code that runs it.

use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;

/// stepmesh: SPIFFE mTLS sidecar, certificate authority, injector and tools.
#[derive(Debug, Parser)]
#[command(name = "stepmesh", version, about, propagate_version = true)]
pub struct Cli {
    /// Log line format (the filter comes from RUST_LOG, default `info`).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "STEPMESH_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The parts of stepmesh.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Certificate authority.
    #[command(subcommand)]
    Ca(crate::ca_cmd::CaCommand),
    /// The sidecar proxy: mTLS in and out, identity authorization, step-up gate.
    Proxy(Box<crate::proxy::ProxyArgs>),
    /// Install (or remove) the iptables rules of transparent interception.
    Init(crate::init::InitArgs),
    /// Sidecar injection: the admission webhook, or offline on YAML files.
    Inject(crate::inject::InjectArgs),
    /// Step-up in front of the Kubernetes API server (kubectl talks to it).
    #[command(subcommand)]
    Gateway(crate::gateway::GatewayCommand),
    /// Policy tools: check, explain a decision, compile to NetworkPolicies.
    #[command(subcommand)]
    Policy(crate::policy_cmd::PolicyCommand),
    /// The NetworkPolicy controller: keeps the cluster's NetworkPolicies
    /// equal to the policy ConfigMaps.
    #[command(subcommand)]
    Netpol(crate::netsync::NetpolCommand),
    /// Certificate tools.
    #[command(subcommand)]
    Cert(crate::cert_cmd::CertCommand),
    /// kubectl exec credential plugin: OIDC tokens (device flow, cache,
    /// refresh, step-up on the gateway's challenge) as an ExecCredential.
    Login(Box<crate::login::LoginArgs>),
    /// A whole mesh on loopback: CA, identity provider, two workloads.
    Demo(crate::demo::DemoArgs),
}

/// The sidecar-only binary (`stepmesh-proxy`): the flags of `stepmesh
/// proxy`, without the subcommand. Its `main` names nothing but the data
/// plane, so the linker leaves out the CA, gateway, injector, controllers
/// and tools, and a pod maps less code (docs/BENCHMARKS.md, "Idle RSS").
#[derive(Debug, Parser)]
#[command(
    name = "stepmesh-proxy",
    version,
    about = "The stepmesh sidecar alone: the flags of `stepmesh proxy`."
)]
pub struct ProxyCli {
    /// Log line format (the filter comes from RUST_LOG, default `info`).
    #[arg(long, value_enum, default_value_t, env = "STEPMESH_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// The sidecar's flags.
    #[command(flatten)]
    pub proxy: crate::proxy::ProxyArgs,
}
