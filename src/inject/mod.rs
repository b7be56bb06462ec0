//! Sidecar injection: the admission webhook (`inject serve`) and the same
//! mutation offline (`inject -f FILE`). Decoding ([`review`]) is kept apart
//! from the pure pod mutation ([`mutate`]).

pub mod config;
pub mod metrics;
pub mod mutate;
pub mod net_raw;
pub mod offline;
pub mod overrides;
pub mod patch;
pub mod probes;
pub mod review;
pub mod server;
pub mod template;

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use self::config::InjectorConfig;
use crate::exit::{self, ConfigResult as _};
use crate::units::parse_duration;

/// Flags of `stepmesh inject`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct InjectArgs {
    /// Run the admission webhook.
    #[command(subcommand)]
    pub command: Option<InjectCommand>,
    /// Inject offline into the objects of this YAML file (`-` for stdin) and
    /// print the result.
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    /// Injector configuration file (YAML; defaults for every field).
    #[arg(long, global = true, env = "STEPMESH_INJECT_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Subcommands of `stepmesh inject`.
#[derive(Debug, Subcommand)]
pub enum InjectCommand {
    /// The HTTPS mutating admission webhook on /inject.
    Serve(ServeArgs),
}

/// Flags of `stepmesh inject serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (HTTPS).
    #[arg(long, default_value = "0.0.0.0:8443", env = "STEPMESH_INJECT_LISTEN")]
    pub listen: SocketAddr,
    /// Serving certificate chain (PEM; reloaded when it changes).
    #[arg(long, env = "STEPMESH_INJECT_CERT")]
    pub cert: PathBuf,
    /// Serving private key (PEM; reloaded when it changes).
    #[arg(long, env = "STEPMESH_INJECT_KEY")]
    pub key: PathBuf,
    /// How often the certificate files are checked, e.g. `2s` or `500ms`.
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = parse_duration)]
    pub reload_interval: Duration,
    /// Deadline for receiving a request body, a wait (at most 1 s) for room
    /// under `--max-body-bytes-in-flight` included (408 or 503 beyond); the API
    /// server gives up after the webhook's `timeoutSeconds` (5 s) anyway.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub body_timeout: Duration,
    /// After SIGTERM, how long in-flight reviews may finish.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Largest request body accepted (bytes); the API server sends at most ~3 MiB.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Request bodies held at once, all connections together (bytes; each
    /// request reserves its declared length, or `--max-body-bytes`, before
    /// reading): the webhook's memory stays bounded whoever sends.
    #[arg(long, default_value_t = 32 << 20)]
    pub max_body_bytes_in_flight: usize,
}

/// Runs the webhook or offline injection.
pub async fn run(args: InjectArgs) -> anyhow::Result<()> {
    let config = InjectorConfig::load(args.config.as_deref()).config_err()?;
    match (args.command, args.file) {
        (Some(InjectCommand::Serve(serve)), _) => run_server(serve, config).await,
        // Everything offline injection reads is the operator's input: a
        // failure is theirs to fix (exit 64).
        (None, Some(file)) => run_offline(&file, &config).config_err(),
        (None, None) => Err(exit::config(anyhow::anyhow!(
            "give -f FILE (or -f - for stdin), or `serve`"
        ))),
    }
}

fn run_offline(file: &std::path::Path, config: &InjectorConfig) -> anyhow::Result<()> {
    let input = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let (output, reports) = offline::inject_yaml(&input, config)?;
    for r in reports {
        eprintln!("{} {}", r.object, r.action);
    }
    print!("{output}");
    Ok(())
}

async fn run_server(args: ServeArgs, config: InjectorConfig) -> anyhow::Result<()> {
    let cert = crate::tls::serving::ReloadingCert::load(&args.cert, &args.key).config_err()?;
    let tls_config = crate::tls::serving::server_config(cert.clone())?;
    let limits = server::Limits {
        max_body: args.max_body_bytes,
        body_timeout: args.body_timeout,
        bodies_in_flight: args.max_body_bytes_in_flight,
    };
    let server = server::Server::bind(args.listen, tls_config, config, limits)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = server.local_addr()?;
    tokio::spawn(cert.watch(args.reload_interval));
    tracing::info!(%addr, "injector webhook listening on /inject");
    // Tests and scripts read the bound port from this line.
    println!("listening on {addr}");
    server.run(shutdown_signal(), args.drain_timeout).await;
    tracing::info!("injector stopped");
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
}
